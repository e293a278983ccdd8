"""squad: Hub schema from a local folder, through datasets.load_dataset like the Hub version."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nemo_rl.config.schema import DatasetConfig
from nemo_rl.data.datasets import build_dataset
from nemo_rl.data.datasets.squad import SquadDataset
from nemo_rl.data.interfaces import DataError

REPO = Path(__file__).resolve().parents[4]
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def test_squad_folder_formats_context_question_answer():
    dataset = SquadDataset(data_path=str(FIXTURES / "squad-mini"))
    train, validation = dataset.formatted_ds["train"], dataset.formatted_ds["validation"]
    assert (len(train), len(validation)) == (6, 2)
    assert train[0]["messages"] == [
        {"role": "system", "content": "Ada Lovelace was born in London in 1815."},
        {"role": "user", "content": "Where was Ada Lovelace born?"},
        {"role": "assistant", "content": "London"},
    ]
    assert validation[0]["messages"][2] == {"role": "assistant", "content": "Italy"}
    assert dataset.task_spec.task_name == "squad"


def test_embedded_squad_tiny():
    dataset = SquadDataset(data_path=str(REPO / "assets" / "squad-tiny"))
    assert len(dataset.formatted_ds["train"]) >= 1000 and len(dataset.formatted_ds["validation"]) >= 100


def test_split_validation_size_replaces_the_validation_split():
    config = DatasetConfig(
        dataset_name="squad", data_path=str(FIXTURES / "squad-mini"), split_validation_size=0.34, seed=1
    )
    dataset = build_dataset(config)
    train, validation = dataset.formatted_ds["train"], dataset.formatted_ds["validation"]
    assert (len(train), len(validation)) == (4, 2)
    # The two come from the 6 train rows (not the source's validation split) and partition them.
    source_train = SquadDataset(data_path=str(FIXTURES / "squad-mini")).formatted_ds["train"]
    questions = sorted(row["messages"][1]["content"] for row in source_train)
    assert sorted(row["messages"][1]["content"] for row in [*train, *validation]) == questions


def test_row_without_answers_names_dataset_split_and_row(tmp_path):
    rows = [json.loads(line) for line in (FIXTURES / "squad-mini" / "train.jsonl").read_text().splitlines()]
    rows[3]["answers"] = {"text": [], "answer_start": []}
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(
        DataError, match=rf"{tmp_path} split train row 3: answers.text must hold at least one"
    ):
        SquadDataset(data_path=str(tmp_path))


def test_every_gold_answer_is_kept_beside_the_first_as_the_assistant_turn(tmp_path):
    row = {"id": "1", "title": "T", "context": "In 1793, Dmitri Kessski was born in Larkwick.",
           "question": "Who was born in Larkwick?",
           "answers": {"text": ["Dmitri Kessski", "Kessski", "Dmitri Kessski"], "answer_start": [9, 16, 9]}}
    (tmp_path / "train.jsonl").write_text(json.dumps(row) + "\n")
    formatted = SquadDataset(data_path=str(tmp_path)).formatted_ds["train"][0]
    assert formatted["messages"][2] == {"role": "assistant", "content": "Dmitri Kessski"}
    assert formatted["gold_answers"] == ["Dmitri Kessski", "Kessski"]  # in order, duplicates once
