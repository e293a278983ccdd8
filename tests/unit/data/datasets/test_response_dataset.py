"""ResponseDataset: input_key/output_key pairs from JSONL/JSON, messages rows passed through."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nemo_rl.data.datasets.response_dataset import ResponseDataset
from nemo_rl.data.interfaces import DataError

REPO = Path(__file__).resolve().parents[4]
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def test_pairs_and_passthrough_rows():
    rows = ResponseDataset(data_path=str(FIXTURES / "responses.jsonl")).formatted_ds["train"]
    assert len(rows) == 4
    assert rows[0]["messages"] == [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris"},
    ]
    assert rows[2]["messages"] == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]


def test_custom_keys_from_a_json_array(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps([{"question": "2+2?", "answer": 4}, {"question": "3+3?", "answer": "6"}]))
    rows = ResponseDataset(data_path=str(path), input_key="question", output_key="answer").formatted_ds[
        "train"
    ]
    assert [r["messages"][1]["content"] for r in rows] == ["4", "6"]


def write_lines(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_missing_key_names_key_file_line_and_keys_present(tmp_path):
    path = tmp_path / "train.jsonl"
    write_lines(path, [{"question": "q", "answer": "a"}] * 16 + [{"prompt": "p", "completion": "c"}])
    with pytest.raises(DataError) as error:
        ResponseDataset(data_path=str(path), input_key="question", output_key="answer")
    assert str(error.value) == (
        f"data.train.input_key='question' not found in {path} line 17; keys there: ['prompt', 'completion']"
    )


def test_empty_response_is_an_error(tmp_path):
    path = tmp_path / "train.jsonl"
    write_lines(path, [{"input": "q", "output": "a"}, {"input": "q", "output": " "}])
    with pytest.raises(DataError, match=rf"data.validation.output_key='output' in {path} line 2 is empty"):
        ResponseDataset(data_path=str(path), config_path="data.validation")


def test_non_text_response_is_an_error(tmp_path):
    path = tmp_path / "train.jsonl"
    write_lines(path, [{"input": "q", "output": ["a", "b"]}])
    with pytest.raises(
        DataError, match=rf"output_key='output' in {path} line 1 is a list, expected a string"
    ):
        ResponseDataset(data_path=str(path))


def test_bad_messages_row_names_line_and_message(tmp_path):
    path = tmp_path / "train.jsonl"
    write_lines(
        path,
        [
            {"input": "q", "output": "a"},
            {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]},
        ],
    )
    with pytest.raises(DataError, match=rf"{path} line 2: messages\[0\].role='assistant': wrong role order"):
        ResponseDataset(data_path=str(path))


def test_data_path_is_required():
    with pytest.raises(DataError, match="data.train.data_path is required for ResponseDataset"):
        ResponseDataset()
