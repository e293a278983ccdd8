"""Reading local JSON/JSONL with 1-based line numbers in every error."""

from __future__ import annotations

import pytest

from nemo_rl.data.datasets.local_files import load_rows, read_json_rows
from nemo_rl.data.interfaces import DataError


def test_jsonl_rows_know_their_lines(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n{"a": 3}\n')
    rows = read_json_rows(str(path))
    assert [r.row["a"] for r in rows] == [1, 2, 3]
    assert [r.where for r in rows] == [f"{path} line 1", f"{path} line 3", f"{path} line 4"]


def test_json_array_rows_know_their_lines(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('[\n  {"a": 1},\n\n  {"a": 2,\n   "b": 3}, {"a": 4}\n]\n')
    rows = read_json_rows(str(path))
    assert [(r.row["a"], r.where.rsplit(" ", 1)[1]) for r in rows] == [(1, "2"), (2, "4"), (4, "5")]


def test_json_file_holding_json_lines(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('{"a": 1}\n{"a": 2}\n')
    assert [r.row["a"] for r in read_json_rows(str(path))] == [1, 2]


def test_invalid_json_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": 3,, "b": 4}\n')
    with pytest.raises(
        DataError, match=rf"{path} line 3: invalid JSON: Expecting property name .*\(column 9\)"
    ):
        read_json_rows(str(path))


def test_invalid_json_in_array(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('[\n  {"a": 1},\n  {"a": 2}\n  {"a": 3}\n]\n')
    with pytest.raises(DataError, match=rf"{path} line 4: invalid JSON: Expecting ',' delimiter or ']'"):
        read_json_rows(str(path))


def test_non_utf8_bytes(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"a": "ok"}\n{"a": "caf\xe9"}\n')
    with pytest.raises(DataError, match=rf"{path} line 2: not valid UTF-8 \(byte e9 at byte column 11"):
        read_json_rows(str(path))


def test_row_that_is_not_an_object(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match=rf"{path} line 2: expected a JSON object \(one row\), got list"):
        read_json_rows(str(path))


def test_missing_local_file_is_not_looked_up_on_the_hub(tmp_path):
    with pytest.raises(DataError, match=r"data.validation.data_path='.*nope.jsonl': no such file"):
        load_rows(str(tmp_path / "nope.jsonl"), split=None, config_path="data.validation")
