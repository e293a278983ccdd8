"""Reading dataset rows, each with the place it came from, so errors can say file and line.

Local `.jsonl` files are read one object per line; local `.json` files hold either a JSON array of
objects or, like many files named `.json`, one object per line. Every row keeps a `where` string
(`/data/train.jsonl line 17`, 1-based) for the messages of `DataError`. Anything that is not a
local JSON/JSONL file goes through `datasets.load_dataset` (a local directory, a `.parquet`/`.csv`
file or a Hugging Face Hub name) or `datasets.load_from_disk` (a `save_to_disk` folder); those rows are located by dataset name, split and row index.
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

from nemo_rl.data.interfaces import DataError

JSON_SUFFIXES = (".jsonl", ".json")
OTHER_FILE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


class LocatedRow(NamedTuple):
    where: str  # "/data/train.jsonl line 17" or "rajpurkar/squad split train row 16"
    row: dict[str, Any]


def read_json_rows(path: str) -> list[LocatedRow]:
    """All objects of a local JSON Lines file or JSON array, each with its 1-based line."""
    with open(path, "rb") as handle:
        data = handle.read()
    text = _decode_utf8(data, path)
    first = text.lstrip()[:1]
    if path.endswith(".json") and first == "[":
        return _read_json_array(text, path)
    return _read_json_lines(text, path)


def _decode_utf8(data: bytes, path: str) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        bad = data[error.start : error.end]
        raise DataError(
            f"{path} line {line}: not valid UTF-8 (byte {bad.hex(' ')} at byte column {column}: "
            f"{error.reason}); re-encode the file as UTF-8"
        ) from None
    return text.removeprefix("\ufeff")  # a byte-order mark is not data


def _read_json_lines(text: str, path: str) -> list[LocatedRow]:
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            hint = ""
            if number == 1 and line.strip() in ("{", "["):
                hint = "; expected one JSON object per line (JSON Lines) or a JSON array of objects"
            raise DataError(
                f"{path} line {number}: invalid JSON: {error.msg} (column {error.colno}){hint}"
            ) from None
        rows.append(LocatedRow(f"{path} line {number}", _expect_object(value, path, number)))
    return rows


def _read_json_array(text: str, path: str) -> list[LocatedRow]:
    """Walks the array element by element so that each row knows the line it starts on."""
    decoder = json.JSONDecoder()
    rows: list[LocatedRow] = []
    position = text.index("[") + 1

    def line_of(offset: int) -> int:
        return text.count("\n", 0, offset) + 1

    def fail(offset: int, message: str) -> DataError:
        column = offset - (text.rfind("\n", 0, offset) + 1) + 1
        return DataError(f"{path} line {line_of(offset)}: invalid JSON: {message} (column {column})")

    position = _skip_whitespace(text, position)
    if text.startswith("]", position):
        position += 1
    else:
        while True:
            try:
                value, end = decoder.raw_decode(text, position)
            except json.JSONDecodeError as error:
                raise fail(error.pos, error.msg) from None
            rows.append(
                LocatedRow(f"{path} line {line_of(position)}", _expect_object(value, path, line_of(position)))
            )
            position = _skip_whitespace(text, end)
            if text.startswith(",", position):
                position = _skip_whitespace(text, position + 1)
            elif text.startswith("]", position):
                position += 1
                break
            else:
                raise fail(position, "Expecting ',' delimiter or ']'")
    position = _skip_whitespace(text, position)
    if position != len(text):
        raise fail(position, "Extra data after the closing ']'")
    return rows


def _skip_whitespace(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position


def _expect_object(value: Any, path: str, line: int) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise DataError(f"{path} line {line}: expected a JSON object (one row), got {type(value).__name__}")
    return value


def looks_local(data_path: str) -> bool:
    """A path the user meant as a local file or folder, as opposed to a Hub name like `org/name`."""
    return (
        os.path.exists(data_path)
        or data_path.startswith(("/", "./", "../", "~"))
        or data_path.endswith(JSON_SUFFIXES + tuple(OTHER_FILE_BUILDERS))
    )


def load_rows(data_path: str, *, split: str | None, config_path: str) -> list[LocatedRow]:
    """The rows of one split: a local JSON/JSONL file, a local folder or other file, or a Hub dataset.

    `split` picks the split of a folder or Hub dataset (default "train"); a single file has one.
    """
    path = os.path.expanduser(data_path)
    if looks_local(data_path) and not os.path.exists(path):
        raise DataError(f"{config_path}.data_path={data_path!r}: no such file or directory")
    if os.path.isfile(path) and path.endswith(JSON_SUFFIXES):
        return read_json_rows(path)
    split = split or "train"
    dataset = load_hf_dataset(data_path, split=split, config_path=config_path)
    return [LocatedRow(f"{data_path} split {split} row {i}", row) for i, row in enumerate(dataset.to_list())]


def is_saved_to_disk(path: str) -> bool:
    """A folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    return os.path.isfile(os.path.join(path, "dataset_dict.json")) or os.path.isfile(
        os.path.join(path, "state.json")
    )


def load_hf_dataset(data_path: str, *, split: str | None, config_path: str):
    """`datasets.load_dataset` for a Hub name (or its copy in the Hub cache, offline with
    HF_HUB_OFFLINE=1), a local folder of data files or a single parquet/csv/arrow file;
    `datasets.load_from_disk` for a `save_to_disk` folder.

    Returns a `Dataset` when `split` is given, else a `DatasetDict`.
    """
    import datasets

    path = os.path.expanduser(data_path)
    suffix = os.path.splitext(path)[1]
    try:
        if os.path.isfile(path):
            if suffix not in OTHER_FILE_BUILDERS:
                raise DataError(
                    f"{config_path}.data_path={data_path!r}: unsupported file type {suffix!r}; "
                    f"expected one of {list(JSON_SUFFIXES + tuple(OTHER_FILE_BUILDERS))}"
                )
            loaded = datasets.load_dataset(OTHER_FILE_BUILDERS[suffix], data_files={"train": path})
            if split is not None:
                return loaded["train"]  # a single file is one split, whatever its name
        elif is_saved_to_disk(path):
            loaded = datasets.load_from_disk(path)
            if isinstance(loaded, datasets.Dataset):
                # one saved split (e.g. `load_dataset(name, split="train_1M").save_to_disk(...)`)
                # stands for whichever split is asked of it
                return loaded if split is not None else datasets.DatasetDict({"train": loaded})
        else:
            loaded = datasets.load_dataset(path)
    except DataError:
        raise
    except Exception as error:  # the Hub, the network and the builders raise many kinds
        raise DataError(
            f"{config_path}.data_path={data_path!r}: could not load it with datasets.load_dataset: {error}"
        ) from error
    if split is None:
        return loaded
    if split not in loaded:
        raise DataError(
            f"{config_path}.split={split!r} not found in {data_path!r}; splits there: {list(loaded)}"
        )
    return loaded[split]
