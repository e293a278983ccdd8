"""OpenAI chat format, with tool calling: one `{"messages": [...], "tools": [...]}` object per row.

`chat_key` (default "messages") names the conversation, `tool_key` (default "tools") the tool
definitions passed to the chat template. A row's `system_key` field, or else `system_prompt`,
becomes the system message when the conversation has none. The last message must be the
assistant's. `use_preserving_dataset: true` keeps rows as plain objects (`PreservingDataset`), so
tool-call arguments whose keys differ between rows are not None-filled into one Arrow schema.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from nemo_rl.data.datasets.common import check_conversation, read_formatted, require_key, require_text
from nemo_rl.data.interfaces import DataError, TaskDataSpec


def format_openai(
    row: dict[str, Any],
    *,
    chat_key: str,
    system_key: str | None,
    system_prompt: str | None,
    tool_key: str | None,
    where: str,
    config_path: str,
) -> dict[str, Any]:
    messages = require_key(row, chat_key, where=where, option="chat_key", config_path=config_path)
    check_conversation(messages, where=where, key=chat_key, require_final_assistant=True)
    messages = list(messages)
    system = None
    if system_key and row.get(system_key) is not None:
        system = require_text(row, system_key, where=where, option="system_key", config_path=config_path)
    elif system_prompt:
        system = system_prompt
    if system is not None and messages[0].get("role") != "system":
        messages.insert(0, {"role": "system", "content": system})
    formatted: dict[str, Any] = {"messages": messages}
    tools = row.get(tool_key) if tool_key else None
    if tools is not None:
        if not isinstance(tools, list):
            raise DataError(
                f"{config_path}.tool_key={tool_key!r} in {where} is a {type(tools).__name__}, expected a list"
            )
        formatted["tools"] = tools
    return formatted


class OpenAIFormatDataset:
    def __init__(
        self,
        data_path: str | None = None,
        chat_key: str = "messages",
        system_key: str | None = None,
        system_prompt: str | None = None,
        tool_key: str | None = "tools",
        use_preserving_dataset: bool = False,
        split: str | None = None,
        config_path: str = "data.train",
    ):
        if not data_path:
            raise DataError(
                f"{config_path}.data_path is required for openai_format (a JSONL/JSON file or a Hub name)"
            )
        format_row = partial(
            format_openai,
            chat_key=chat_key,
            system_key=system_key,
            system_prompt=system_prompt,
            tool_key=tool_key,
            config_path=config_path,
        )
        train = read_formatted(
            data_path, format_row, split=split, config_path=config_path, preserving=use_preserving_dataset
        )
        self.formatted_ds = {"train": train, "validation": None}
        self.task_spec = TaskDataSpec("openai_format")
