"""alpaca: instruction, optional input, output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nemo_rl.data.datasets.alpaca import AlpacaDataset
from nemo_rl.data.interfaces import DataError

REPO = Path(__file__).resolve().parents[4]
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def test_instruction_input_output():
    rows = AlpacaDataset(data_path=str(FIXTURES / "alpaca.json")).formatted_ds["train"]
    assert [r["messages"][0]["content"] for r in rows] == [
        "Give the capital of France.",  # empty input: instruction only
        "Translate to French.\n\nGood morning",
        "Add the numbers.\n\n2 and 3",
        "Name a primary colour.",  # no input key at all
    ]
    assert [r["messages"][1] for r in rows][2] == {"role": "assistant", "content": "5"}


def test_missing_output_names_the_line_of_the_object(tmp_path):
    path = tmp_path / "alpaca.json"
    rows = json.loads((FIXTURES / "alpaca.json").read_text())
    del rows[2]["output"]
    path.write_text(json.dumps(rows, indent=2))  # the third object starts on line 12
    with pytest.raises(DataError) as error:
        AlpacaDataset(data_path=str(path))
    assert str(error.value) == (
        f"data.train.output_key='output' not found in {path} line 12; keys there: ['instruction', 'input']"
    )
