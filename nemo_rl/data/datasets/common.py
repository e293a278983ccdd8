"""What every dataset family shares: field checks with located errors, conversation rules, the
train/validation split (which `build_dataset` applies to every dataset class), and
`read_formatted`, the read-and-format sequence of a dataset read from one `data_path`.

A conversation is a list of messages `{"role", "content", ...}` following chat conventions:
roles are system, user, assistant or tool; a system message may only come first; the first
message after it is the user's; a tool message answers an assistant's tool call; there is at least
one assistant message, and no assistant message is empty (no text and no tool calls).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from nemo_rl.data.datasets.local_files import LocatedRow, load_rows
from nemo_rl.data.datasets.preserving import PreservingDataset
from nemo_rl.data.interfaces import DataError

ROLES = ("system", "user", "assistant", "tool")


def require_key(
    row: dict[str, Any],
    key: str,
    *,
    where: str,
    option: str | None = None,
    config_path: str = "data.train",
    needed_by: str = "",
) -> Any:
    """row[key], or a DataError naming the row, the key and the keys present.

    `option` is the config option that chose `key` (`input_key`); without one, `needed_by` says
    which format fixes the key (`squad`).
    """
    if not isinstance(row, dict) or key not in row:
        present = list(row) if isinstance(row, dict) else type(row).__name__
        if option is None:
            raise DataError(f"key {key!r} ({needed_by}) not found in {where}; keys there: {present}")
        raise DataError(f"{config_path}.{option}={key!r} not found in {where}; keys there: {present}")
    return row[key]


def require_text(
    row: dict[str, Any],
    key: str,
    *,
    where: str,
    option: str | None = None,
    config_path: str = "data.train",
    needed_by: str = "",
    allow_empty: bool = True,
) -> str:
    """row[key] as a string: numbers and booleans are written out, anything else is an error."""
    value = require_key(row, key, where=where, option=option, config_path=config_path, needed_by=needed_by)
    name = f"{config_path}.{option}={key!r}" if option else f"key {key!r}"
    if isinstance(value, (bool, int, float)):
        value = str(value)
    if not isinstance(value, str):
        raise DataError(f"{name} in {where} is a {type(value).__name__}, expected a string: {value!r:.80}")
    if not allow_empty and not value.strip():
        raise DataError(f"{name} in {where} is empty: an empty assistant turn has nothing to learn")
    return value


def check_conversation(
    messages: Any, *, where: str, key: str = "messages", require_final_assistant: bool = False
) -> None:
    """Raises DataError naming `where` and `key[i].field` when `messages` breaks the rules above."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: {key} must be a non-empty list of messages, got {messages!r:.80}")
    seen_tool_call = False
    first_turn = 1 if isinstance(messages[0], dict) and messages[0].get("role") == "system" else 0
    for i, message in enumerate(messages):
        at = f"{where}: {key}[{i}]"
        if not isinstance(message, dict):
            raise DataError(f"{at} must be an object with 'role' and 'content', got {message!r:.80}")
        role = message.get("role")
        if role not in ROLES:
            raise DataError(f"{at}.role={role!r} is not one of {list(ROLES)}")
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise DataError(f"{at}.content is a {type(content).__name__}, expected a string")
        if role == "system" and i != 0:
            raise DataError(f"{at}.role='system': a system message may only be the first message")
        if i == first_turn and role != "user":
            raise DataError(
                f"{at}.role={role!r}: wrong role order, the conversation must start with a user message "
                f"(after an optional system message), got roles {_roles(messages)}"
            )
        if role == "tool" and not seen_tool_call:
            raise DataError(
                f"{at}.role='tool': wrong role order, a tool message must follow an assistant message "
                f"with tool_calls, got roles {_roles(messages)}"
            )
        if role == "assistant":
            tool_calls = message.get("tool_calls")
            if tool_calls:
                seen_tool_call = True
            if not tool_calls and not _has_text(content):
                raise DataError(f"{at}: empty assistant turn (content {content!r}, no tool_calls)")
    if first_turn >= len(messages):
        raise DataError(
            f"{where}: {key} has a system message only; a conversation needs user and assistant turns"
        )
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        raise DataError(f"{where}: {key} has no assistant message, so nothing to learn; got roles {roles}")
    if require_final_assistant and roles[-1] != "assistant":
        raise DataError(
            f"{where}: {key}[{len(messages) - 1}].role={roles[-1]!r}: the last message must be the assistant's"
        )


def _has_text(content: Any) -> bool:
    if isinstance(content, str):
        return bool(content.strip())
    if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}]
        return any(isinstance(part, dict) and str(part.get("text") or "").strip() for part in content)
    return False


def _roles(messages: list[Any]) -> list[Any]:
    return [m.get("role") if isinstance(m, dict) else m for m in messages]


def as_rows(rows: list[dict[str, Any]], *, preserving: bool = False, config_path: str = "data.train"):
    """Formatted rows as a Hugging Face `Dataset` (Arrow, one schema for all rows), or, with
    `preserving`, a `PreservingDataset` that keeps each row exactly as written."""
    if preserving:
        return PreservingDataset(rows)
    import datasets
    import pyarrow

    try:
        return datasets.Dataset.from_list(rows)
    except (pyarrow.ArrowInvalid, pyarrow.ArrowTypeError, TypeError, ValueError) as error:
        raise DataError(
            f"{config_path}: the rows do not fit one Arrow schema ({error}); rows whose fields change type "
            f"from row to row (e.g. tool-call arguments) need {config_path}.use_preserving_dataset=true"
        ) from error


def split_train_validation(rows, validation_size: float, seed: int):
    """(train, validation): a deterministic random `validation_size` fraction of `rows` becomes
    validation, at least one row; both keep the original row order. Same seed, same split."""
    n = len(rows)
    n_validation = max(1, round(n * validation_size))
    if n_validation >= n:
        raise DataError(
            f"split_validation_size={validation_size} leaves no training rows out of {n}; use a smaller fraction"
        )
    order = list(range(n))
    random.Random(seed).shuffle(order)
    validation = sorted(order[:n_validation])
    train = sorted(order[n_validation:])
    return select(rows, train), select(rows, validation)


def select(rows, indices: list[int]):
    if hasattr(rows, "select"):
        return rows.select(indices)
    return [rows[i] for i in indices]


def read_formatted(
    data_path: str,
    format_row: Callable[..., dict[str, Any]],
    *,
    split: str | None,
    config_path: str,
    preserving: bool = False,
):
    """The rows of `split` of `data_path`, each through `format_row(row, where=...)` (see `as_rows`
    for `preserving`). A source with no rows is an error."""
    located = load_rows(data_path, split=split, config_path=config_path)
    rows = [format_row(row, where=where) for where, row in located]
    if not rows:
        raise DataError(f"{config_path}.data_path={data_path!r} holds no rows")
    return as_rows(rows, preserving=preserving, config_path=config_path)


def read_columns(
    data_path: str,
    columns: dict[str, str],
    *,
    split: str | None,
    dataset_name: str,
    config_path: str,
) -> list[LocatedRow]:
    """The rows of `split` of `data_path`, after checking that each has every column of
    `columns` ({column: what it is used for}); a missing one is a DataError naming the dataset,
    the split (or file line) and the column."""
    located = load_rows(data_path, split=split, config_path=config_path)
    for where, row in located:
        missing = [column for column in columns if not isinstance(row, dict) or column not in row]
        if missing:
            column = missing[0]
            present = list(row) if isinstance(row, dict) else type(row).__name__
            raise DataError(
                f"{config_path} (dataset_name={dataset_name!r}): column {column!r} ({columns[column]}) "
                f"not found in {where}; columns there: {present}"
            )
    return located
