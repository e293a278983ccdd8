"""data.train as a list: rows mixed, each with its own dataset's prompt and processor; shares set
by max_samples; the order a function of sft.seed; data.default under every entry."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import yaml

from nemo_rl.config import load_config
from nemo_rl.config.schema import DataConfig, DatasetConfig, SFTConfig
from nemo_rl.data.dataloaders import build_dataloaders
from nemo_rl.data.datasets import MixedRows, load_datasets
from nemo_rl.data.processors import SFTDataset
from tests.unit.data.data_test_utils import tiny_policy_section, tokenization
from tests.unit.data.datasets.dataset_copies import write_openmathinstruct2, write_tulu3

REPO = Path(__file__).resolve().parents[4]
MATH_PROMPT = str(REPO / "examples" / "prompts" / "math.txt")


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixture-copies")
    return {
        "root": root,
        "openmath": write_openmathinstruct2(root / "omi2"),
        "tulu3": write_tulu3(root / "tulu3"),
    }


def mixture(copies, *, openmath: int = 6, tulu: int = 4, validation=None, shuffle: bool = True) -> DataConfig:
    return DataConfig(
        max_input_seq_length=512,
        shuffle=shuffle,
        num_workers=0,
        train=[
            DatasetConfig(
                dataset_name="OpenMathInstruct-2",
                data_path=str(copies["root"] / "omi2" / "hub"),
                prompt_file=MATH_PROMPT,
                max_samples=openmath,
                split_validation_size=None,
            ),
            DatasetConfig(
                dataset_name="tulu3_sft_mixture",
                data_path=str(copies["root"] / "tulu3"),
                max_samples=tulu,
                split_validation_size=None,
            ),
        ],
        validation=validation,
    )


def loaders_for(data: DataConfig, tokenizer, *, seed: int, batch_size: int = 5):
    sft = SFTConfig(max_num_steps=1, seed=seed, val_global_batch_size=2)
    policy = tiny_policy_section(train_global_batch_size=batch_size, max_total_sequence_length=512)
    return build_dataloaders(load_datasets(data), tokenizer, tokenization(), data, sft, policy)


def test_each_row_keeps_its_datasets_prompt(copies, tokenizer):
    datasets = load_datasets(mixture(copies))
    assert isinstance(datasets.train, MixedRows) and len(datasets.train) == 10
    assert [(p.config_path, len(p.rows)) for p in datasets.train.parts] == [
        ("data.train[0]", 6),
        ("data.train[1]", 4),
    ]
    dataset = SFTDataset(datasets.train, tokenizer, datasets.task_spec, tokenization())
    prompt = Path(MATH_PROMPT).read_text()
    problems = {row["problem"] for row in copies["openmath"]}
    tulu_conversations = [row["messages"] for row in copies["tulu3"]]
    for index in range(10):
        messages, _ = dataset.conversation(index)
        user = next(m for m in messages if m["role"] == "user")["content"]
        if index < 6:  # OpenMathInstruct-2 rows, with the math prompt
            assert user in {prompt.format(problem) for problem in problems}
            assert dataset[index]["task_name"] == "OpenMathInstruct-2"
        else:  # tulu rows, as they are
            assert messages in tulu_conversations
            assert dataset[index]["task_name"] == "tulu3_sft_mixture"


def test_shares_and_determinism_under_sft_seed(copies, tokenizer):
    def epoch_order(seed: int, data: DataConfig) -> list[int]:
        loader = loaders_for(data, tokenizer, seed=seed).train
        loader.sampler.set_epoch(0)
        return [int(i) for batch in loader for i in batch["idx"]]

    data = mixture(copies)
    order = epoch_order(3, data)
    # one epoch of two batches of 5 sees each dataset exactly its share: 6 and 4 rows
    assert sorted(order) == list(range(10))
    assert Counter("openmath" if i < 6 else "tulu" for i in order) == {"openmath": 6, "tulu": 4}
    assert epoch_order(3, data) == order and epoch_order(4, data) != order
    # other shares: 3 and 2, so 3:2 in the single batch of an epoch
    small = epoch_order(3, mixture(copies, openmath=3, tulu=2))
    assert Counter("openmath" if i < 3 else "tulu" for i in small) == {"openmath": 3, "tulu": 2}


def test_validation_is_each_datasets_own_or_the_given_list(copies):
    own = load_datasets(
        mixture(copies).model_copy(
            update={
                "train": [
                    entry.model_copy(update={"split_validation_size": 0.25})
                    for entry in mixture(copies).train
                ]
            }
        )
    )
    assert [(p.config_path, len(p.rows)) for p in own.validation.parts] == [
        ("data.train[0]", 2),
        ("data.train[1]", 1),
    ]
    assert len(own.train) == 4 + 3
    given = load_datasets(
        mixture(
            copies,
            validation=[
                DatasetConfig(
                    dataset_name="tulu3_sft_mixture", data_path=str(copies["root"] / "tulu3"), max_samples=3
                ),
            ],
        )
    )
    assert [(p.config_path, len(p.rows)) for p in given.validation.parts] == [("data.validation[0]", 3)]


def test_config_file_with_a_list_and_data_default(copies, tmp_path):
    config = {
        "defaults": str(REPO / "configs" / "sft_tiny.yaml"),
        "data": {
            "train": [
                {
                    "dataset_name": "OpenMathInstruct-2",
                    "data_path": str(copies["root"] / "omi2" / "saved"),
                    "max_samples": 4,
                },
                {"dataset_name": "tulu3_sft_mixture", "data_path": str(copies["root"] / "tulu3")},
            ],
            "default": {"seed": 7, "prompt_file": MATH_PROMPT},
        },
    }
    path = tmp_path / "mixture.yaml"
    path.write_text(yaml.safe_dump(config))
    cfg = load_config(str(path))
    assert [entry.seed for entry in cfg.data.train] == [7, 7]
    assert [entry.prompt_file for entry in cfg.data.train] == [MATH_PROMPT, MATH_PROMPT]
    assert cfg.data.train[0].max_samples == 4 and cfg.data.train[1].max_samples is None


def test_an_empty_list_is_refused():
    with pytest.raises(ValueError, match="an empty list of datasets"):
        DataConfig(max_input_seq_length=8, train=[])
