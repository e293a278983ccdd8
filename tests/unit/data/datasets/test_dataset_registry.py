"""load_datasets: names, dotted paths, validation splits and the dataset interface."""

from __future__ import annotations

from pathlib import Path

import pytest

from nemo_rl.config.schema import DataConfig, DatasetConfig
from nemo_rl.data.datasets import DATASET_REGISTRY, build_dataset, load_datasets
from nemo_rl.data.interfaces import DataError

REPO = Path(__file__).resolve().parents[4]
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


RESPONSES = str(FIXTURES / "responses.jsonl")
SQUAD = str(FIXTURES / "squad-mini")


def data_config(train: dict, validation: dict | None = None) -> DataConfig:
    return DataConfig(
        max_input_seq_length=64,
        train=DatasetConfig(**train),
        validation=DatasetConfig(**validation) if validation is not None else None,
    )


def test_registered_names():
    assert sorted(DATASET_REGISTRY) == [
        "GeneralConversationsJsonlDataset",
        "OpenMathInstruct-2",
        "ResponseDataset",
        "alpaca",
        "multiple_choice",
        "open_assistant",
        "openai_format",
        "openmathinstruct2",
        "squad",
        "tulu3_sft_mixture",
    ]


@pytest.mark.parametrize(
    ("train", "n_train"),
    [
        ({"dataset_name": "squad", "data_path": SQUAD}, 6),
        ({"dataset_name": "ResponseDataset", "data_path": RESPONSES}, 4),
        ({"dataset_name": "openai_format", "data_path": str(FIXTURES / "openai_tools.jsonl")}, 3),
        ({"dataset_name": "alpaca", "data_path": str(FIXTURES / "alpaca.json")}, 4),
    ],
)
def test_each_format_by_name(train, n_train):
    datasets = load_datasets(data_config(train))
    assert len(datasets.train) == n_train
    assert datasets.task_spec.task_name == train["dataset_name"]
    assert all(row["messages"][-1]["role"] == "assistant" for row in datasets.train)


def test_train_dataset_validation_split():
    datasets = load_datasets(data_config({"dataset_name": "squad", "data_path": SQUAD}))
    assert len(datasets.validation) == 2 and datasets.validation_task_spec is datasets.task_spec
    no_validation = load_datasets(data_config({"dataset_name": "ResponseDataset", "data_path": RESPONSES}))
    assert no_validation.validation is None


def test_separate_validation_dataset_uses_its_train_split_or_the_named_split():
    train = {"dataset_name": "ResponseDataset", "data_path": RESPONSES}
    datasets = load_datasets(data_config(train, {"dataset_name": "squad", "data_path": SQUAD}))
    assert len(datasets.validation) == 6  # squad's train split
    datasets = load_datasets(
        data_config(train, {"dataset_name": "squad", "data_path": SQUAD, "split": "validation"})
    )
    assert len(datasets.validation) == 2
    assert (
        datasets.task_spec.task_name == "ResponseDataset"
        and datasets.validation_task_spec.task_name == "squad"
    )


def contents(rows) -> list[str]:
    return [row["messages"][0]["content"] for row in rows]


def test_split_validation_size_is_deterministic_per_seed(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(f'{{"input": "q{i}", "output": "a{i}"}}\n' for i in range(40)))

    def split(seed):
        datasets = load_datasets(
            data_config(
                {
                    "dataset_name": "ResponseDataset",
                    "data_path": str(path),
                    "split_validation_size": 0.25,
                    "seed": seed,
                }
            )
        )
        return contents(datasets.train), contents(datasets.validation)

    train, validation = split(7)
    assert len(train) == 30 and len(validation) == 10
    assert sorted(train + validation) == sorted(f"q{i}" for i in range(40))
    assert split(7) == (train, validation)
    assert split(8)[1] != validation


def test_dotted_path_class_with_config_fields_and_kwargs(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(FIXTURES))
    path = tmp_path / "pairs.txt"
    path.write_text("".join(f"question {i}|answer {i}\n" for i in range(10)))
    datasets = load_datasets(
        data_config(
            {
                "dataset_name": "custom_dataset.ShoutingDataset",
                "data_path": str(path),
                "kwargs": {"shout": True},
                "split_validation_size": 0.2,
                "seed": 3,  # not accepted by the class: the loader splits
            }
        )
    )
    assert len(datasets.train) == 8 and len(datasets.validation) == 2
    assert datasets.train[0]["messages"][1]["content"].startswith("ANSWER")
    assert datasets.task_spec.task_name == "shouting"


@pytest.mark.parametrize(
    ("dataset_name", "task_name"),
    [("custom_dataset.ShoutingDataset", "shouting"), ("ResponseDataset", "ResponseDataset")],
)
def test_prompt_files_are_applied_by_the_loader_to_every_class(tmp_path, monkeypatch, dataset_name, task_name):
    monkeypatch.syspath_prepend(str(FIXTURES))
    (tmp_path / "pairs.txt").write_text("q|a\n")
    (tmp_path / "prompt.txt").write_text("Q: {}")
    (tmp_path / "system.txt").write_text("Be brief.")
    dataset = build_dataset(
        DatasetConfig(
            dataset_name=dataset_name,
            data_path=str(tmp_path / "pairs.txt") if "custom" in dataset_name else RESPONSES,
            prompt_file=str(tmp_path / "prompt.txt"),
            system_prompt_file=str(tmp_path / "system.txt"),
        )
    )
    spec = dataset.task_spec
    assert (spec.task_name, spec.prompt, spec.system_prompt) == (task_name, "Q: {}", "Be brief.")


def test_a_class_that_splits_itself_is_not_split_again(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(FIXTURES))
    path = tmp_path / "pairs.txt"
    path.write_text("".join(f"question {i}|answer {i}\n" for i in range(10)))
    dataset = build_dataset(
        DatasetConfig(
            dataset_name="custom_dataset.SelfSplittingDataset", data_path=str(path), split_validation_size=0.3
        )
    )
    assert contents(dataset.formatted_ds["train"]) == [f"question {i}" for i in range(7)]
    assert contents(dataset.formatted_ds["validation"]) == [f"question {i}" for i in range(7, 10)]


def test_dotted_path_class_without_the_interface(monkeypatch):
    monkeypatch.syspath_prepend(str(FIXTURES))
    with pytest.raises(
        DataError, match="NoFormattedDataset has no formatted_ds attribute; a dataset class must set"
    ):
        build_dataset(DatasetConfig(dataset_name="custom_dataset.NoFormattedDataset"))


def test_dotted_path_errors(monkeypatch):
    monkeypatch.syspath_prepend(str(FIXTURES))
    with pytest.raises(DataError, match="cannot import module 'no_such_pkg.mod'"):
        build_dataset(DatasetConfig(dataset_name="no_such_pkg.mod.Cls"))
    with pytest.raises(DataError, match="module 'custom_dataset' has no attribute 'Missing'"):
        build_dataset(DatasetConfig(dataset_name="custom_dataset.Missing"))
    with pytest.raises(DataError, match=r"data.train.kwargs.volume: ShoutingDataset does not accept it"):
        build_dataset(
            DatasetConfig(dataset_name="custom_dataset.ShoutingDataset", data_path="x", kwargs={"volume": 3})
        )


def test_unknown_name_lists_registered_names():
    with pytest.raises(DataError) as error:
        build_dataset(DatasetConfig(dataset_name="sqaud"), "data.validation")
    message = str(error.value)
    assert message.startswith(
        "data.validation.dataset_name='sqaud' is not a registered dataset (did you mean 'squad'?)"
    )
    assert (
        str(sorted(DATASET_REGISTRY)) in message
        and "dotted import path" in message
    )


def test_option_that_does_not_apply_is_reported():
    with pytest.raises(
        DataError, match=r"data.train.input_key='question' does not apply to dataset_name='squad'"
    ):
        build_dataset(DatasetConfig(dataset_name="squad", data_path=SQUAD, input_key="question"))


def test_unknown_processor_is_reported():
    with pytest.raises(
        DataError, match=r"data.train.processor='chat' is not a known processor; known: \['sft_processor'\]"
    ):
        load_datasets(data_config({"dataset_name": "squad", "data_path": SQUAD, "processor": "chat"}))
