"""OpenMathInstruct-2, tulu3_sft_mixture, open_assistant and general conversations, read from
small local copies in the Hub's formats (dataset_copies.py), and max_samples."""

from __future__ import annotations

from pathlib import Path

import pytest

from nemo_rl.config.schema import DataConfig, DatasetConfig
from nemo_rl.data.datasets import build_dataset, load_datasets
from nemo_rl.data.datasets.common import as_rows
from nemo_rl.data.interfaces import DataError, TaskDataSpec
from nemo_rl.data.processors import SFTDataset

from tests.unit.data.data_test_utils import tokenization
from tests.unit.data.datasets.dataset_copies import (
    write_general_conversations,
    write_oasst,
    write_openmathinstruct2,
    write_tulu3,
)

REPO = Path(__file__).resolve().parents[4]
MATH_PROMPT = str(REPO / "examples" / "prompts" / "math.txt")
HEADER = "<|start_header_id|>assistant<|end_header_id|>\n\n"


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub-copies")
    return {
        "root": root,
        "openmath": write_openmathinstruct2(root / "OpenMathInstruct-2"),
        "tulu3": write_tulu3(root / "tulu-3-sft-mixture"),
        "oasst": write_oasst(root / "oasst1"),
        "general": write_general_conversations(root / "general.jsonl"),
    }


def learned_text(tokenizer, rows, task_spec=None) -> list[str]:
    """For each row, the text of the tokens that carry loss."""
    dataset = SFTDataset(rows, tokenizer, task_spec or TaskDataSpec("t"), tokenization())
    return [tokenizer.decode(d["input_ids"][d["token_mask"].bool()]) for d in dataset.samples]


# ---------------------------------------------------------------- OpenMathInstruct-2


@pytest.mark.parametrize("layout", ["hub", "saved", "rows.jsonl", "hub/data/train_1M-00000-of-00001.parquet"])
def test_openmathinstruct2_reads_every_local_layout_the_same(copies, layout):
    source = copies["openmath"]
    cfg = DatasetConfig(
        dataset_name="OpenMathInstruct-2", data_path=str(copies["root"] / "OpenMathInstruct-2" / layout)
    )
    rows = build_dataset(cfg).formatted_ds["train"]
    assert [row["messages"] for row in rows] == [
        [{"role": "user", "content": s["problem"]}, {"role": "assistant", "content": s["expected_answer"]}]
        for s in source
    ]


def test_openmathinstruct2_generated_solution_prompt_file_and_loss_mask(copies, tokenizer):
    source = copies["openmath"][0]
    data = DataConfig(
        max_input_seq_length=512,
        train=DatasetConfig(
            dataset_name="OpenMathInstruct-2",
            data_path=str(copies["root"] / "OpenMathInstruct-2" / "hub"),
            output_key="generated_solution",
            prompt_file=MATH_PROMPT,
        ),
    )
    datasets = load_datasets(data)
    # no data.validation and no split_validation_size: NeMo RL's 5% (at least one row) is held out
    assert (len(datasets.train), len(datasets.validation)) == (11, 1)
    dataset = SFTDataset(datasets.train, tokenizer, datasets.task_spec, tokenization())
    index = next(
        i for i, row in enumerate(datasets.train) if row["messages"][0]["content"] == source["problem"]
    )
    messages, _ = dataset.conversation(index)
    prompt = Path(MATH_PROMPT).read_text()
    assert messages[0] == {"role": "user", "content": prompt.format(source["problem"])}
    datum = dataset[index]
    learned = tokenizer.decode(datum["input_ids"][datum["token_mask"].bool()])
    assert learned == HEADER + source["generated_solution"] + "<|eot_id|>" + tokenizer.eos_token
    prompt_part = tokenizer.decode(datum["input_ids"][~datum["token_mask"].bool()])
    assert "Reason step by step" in prompt_part and source["problem"] in prompt_part


def test_openmathinstruct2_refuses_an_unknown_output_key_and_hub_split(copies):
    with pytest.raises(
        DataError, match=r"data.train.output_key='answer' for OpenMathInstruct-2; expected one of"
    ):
        build_dataset(DatasetConfig(dataset_name="OpenMathInstruct-2", output_key="answer"))
    with pytest.raises(
        DataError, match=r"data.train.split='train_3M' for nvidia/OpenMathInstruct-2; its splits"
    ):
        build_dataset(DatasetConfig(dataset_name="OpenMathInstruct-2", split="train_3M"))


def test_missing_column_names_dataset_split_and_column(copies, tmp_path):
    rows = [{k: v for k, v in row.items() if k != "problem"} for row in copies["openmath"]]
    folder = tmp_path / "broken"
    (folder / "data").mkdir(parents=True)
    as_rows(rows).to_parquet(str(folder / "data" / "train_1M-00000-of-00001.parquet"))
    with pytest.raises(DataError) as error:
        build_dataset(
            DatasetConfig(dataset_name="OpenMathInstruct-2", data_path=str(folder)), "data.train[1]"
        )
    assert str(error.value) == (
        f"data.train[1] (dataset_name='OpenMathInstruct-2'): column 'problem' (the user message) not found in "
        f"{folder} split train_1M row 0; columns there: ['generated_solution', 'expected_answer', 'problem_source']"
    )


# ---------------------------------------------------------------- tulu3_sft_mixture


def test_tulu3_messages_and_loss_mask(copies, tokenizer):
    source = copies["tulu3"]
    cfg = DatasetConfig(
        dataset_name="tulu3_sft_mixture", data_path=str(copies["root"] / "tulu-3-sft-mixture")
    )
    rows = build_dataset(cfg).formatted_ds["train"]
    assert [row["messages"] for row in rows] == [s["messages"] for s in source]
    assert rows[0]["messages"][0]["role"] == "system"
    two_exchanges = [
        i for i, s in enumerate(source) if len([m for m in s["messages"] if m["role"] == "assistant"]) == 2
    ]
    learned = learned_text(tokenizer, [rows[i] for i in two_exchanges])
    for text, i in zip(learned, two_exchanges, strict=True):
        answers = [m["content"] for m in source[i]["messages"] if m["role"] == "assistant"]
        assert text == f"{HEADER}{answers[0]}<|eot_id|>{HEADER}{answers[1]}<|eot_id|>{tokenizer.eos_token}"


def test_tulu3_holds_out_five_percent_unless_told_otherwise(copies):
    path = str(copies["root"] / "tulu-3-sft-mixture")
    held_out = load_datasets(
        DataConfig(
            max_input_seq_length=64, train=DatasetConfig(dataset_name="tulu3_sft_mixture", data_path=path)
        )
    )
    assert (len(held_out.train), len(held_out.validation)) == (7, 1)
    none = load_datasets(
        DataConfig(
            max_input_seq_length=64,
            train=DatasetConfig(dataset_name="tulu3_sft_mixture", data_path=path, split_validation_size=None),
        )
    )
    assert (len(none.train), none.validation) == (8, None)


# ---------------------------------------------------------------- open_assistant


def _text(splits, message_id):
    return next(m["text"] for rows in splits.values() for m in rows if m["message_id"] == message_id)


def test_oasst_trees_become_root_to_leaf_conversations(copies, tokenizer):
    splits = copies["oasst"]
    dataset = build_dataset(
        DatasetConfig(dataset_name="open_assistant", data_path=str(copies["root"] / "oasst1"))
    )

    def conversation(*ids):
        return [
            {"role": "user" if mid.startswith("p") else "assistant", "content": _text(splits, mid)}
            for mid in ids
        ]

    # a1 before a2 (rank), p3 (unanswered) cut, the deleted a5 and its reply left out
    assert [row["messages"] for row in dataset.formatted_ds["train"]] == [
        conversation("p1", "a1", "p2", "a3"),
        conversation("p1", "a2"),
        conversation("p4", "a4"),
    ]
    assert [row["messages"] for row in dataset.formatted_ds["validation"]] == [conversation("p6", "a6")]
    learned = learned_text(tokenizer, dataset.formatted_ds["train"].select([0]))
    assert learned == [
        f"{HEADER}{_text(splits, 'a1')}<|eot_id|>{HEADER}{_text(splits, 'a3')}<|eot_id|>{tokenizer.eos_token}"
    ]


def test_oasst_lang_keeps_trees_in_that_language(copies):
    cfg = DatasetConfig(
        dataset_name="open_assistant", data_path=str(copies["root"] / "oasst1"), kwargs={"lang": "de"}
    )
    rows = build_dataset(cfg).formatted_ds["train"]
    assert [[m["content"][:4] for m in row["messages"]] for row in rows] == [["[p4]", "[a4]"]]


def test_oasst_missing_column_is_named(tmp_path, copies):
    rows = [{k: v for k, v in m.items() if k != "parent_id"} for m in copies["oasst"]["train"]]
    (tmp_path / "data").mkdir()
    as_rows(rows).to_parquet(str(tmp_path / "data" / "train-00000-of-00001.parquet"))
    with pytest.raises(
        DataError,
        match=(
            r"data.train \(dataset_name='open_assistant'\): column 'parent_id' \(the id of the message it answers\) "
            r"not found in .* split train row 0"
        ),
    ):
        build_dataset(DatasetConfig(dataset_name="open_assistant", data_path=str(tmp_path)))


# ---------------------------------------------------------------- general conversations


def test_general_conversations_map_senders_to_roles(copies):
    path = copies["root"] / "general.jsonl"
    rows = build_dataset(
        DatasetConfig(dataset_name="GeneralConversationsJsonlDataset", data_path=str(path))
    ).formatted_ds["train"]
    roles = {
        "human": "user",
        "user": "user",
        "gpt": "assistant",
        "assistant": "assistant",
        "agent": "assistant",
        "system": "system",
    }
    assert [row["messages"] for row in rows] == [
        [{"role": roles[t["from"]], "content": t["value"]} for t in source["conversations"]]
        for source in copies["general"]
    ]


def test_general_conversations_refuse_media(tmp_path):
    path = tmp_path / "media.jsonl"
    path.write_text(
        '{"image": "cat.jpg", "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "A cat."}]}\n'
    )
    with pytest.raises(
        DataError, match=r"media.jsonl line 1: key 'image': media in conversations is not supported"
    ):
        build_dataset(DatasetConfig(dataset_name="GeneralConversationsJsonlDataset", data_path=str(path)))


# ---------------------------------------------------------------- max_samples


def test_max_samples_is_a_seeded_subset_in_source_order(copies):
    path = str(copies["root"] / "OpenMathInstruct-2" / "rows.jsonl")
    problems = [row["problem"] for row in copies["openmath"]]

    def chosen(**fields):
        rows = build_dataset(
            DatasetConfig(dataset_name="OpenMathInstruct-2", data_path=path, **fields)
        ).formatted_ds
        return [r["messages"][0]["content"] for r in rows["train"]], rows["validation"]

    five, _ = chosen(max_samples=5, seed=3)
    assert len(five) == 5 and five == [p for p in problems if p in five]  # source order
    assert chosen(max_samples=5, seed=3)[0] == five and chosen(max_samples=5, seed=4)[0] != five
    assert chosen(max_samples=50)[0] == problems
    # the cap comes first, then the split: 4 train + 1 validation out of the 5
    train, validation = chosen(max_samples=5, seed=3, split_validation_size=0.2)
    assert len(train) == 4 and len(validation) == 1
    assert sorted(train + [validation[0]["messages"][0]["content"]]) == sorted(five)


def test_oasst_from_a_save_to_disk_folder_reads_the_same(copies, tmp_path):
    import datasets

    datasets.DatasetDict(
        {split: datasets.Dataset.from_list(rows) for split, rows in copies["oasst"].items()}
    ).save_to_disk(str(tmp_path / "saved"))
    from_parquet = build_dataset(
        DatasetConfig(dataset_name="open_assistant", data_path=str(copies["root"] / "oasst1"))
    )
    from_disk = build_dataset(DatasetConfig(dataset_name="open_assistant", data_path=str(tmp_path / "saved")))
    for split in ("train", "validation"):
        assert from_disk.formatted_ds[split].to_list() == from_parquet.formatted_ds[split].to_list()
