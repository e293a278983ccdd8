"""General conversations JSONL (NeMo RL's `GeneralConversationsJsonlDataset`), text only.

One object per line with a `conversations` list of `{"from": ..., "value": ...}` turns; `from` is
user/human, assistant/gpt/agent or system. Media (`<image>`, `<sound>`, `<video>` tags and the
matching keys) is not supported: such a row is refused, naming the key.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from nemo_rl.data.datasets.common import check_conversation, read_formatted, require_key, require_text
from nemo_rl.data.interfaces import DataError, TaskDataSpec

SENDERS = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "agent": "assistant",
    "system": "system",
}
MEDIA_KEYS = ("image", "images", "sound", "audio", "video")
NAME = "GeneralConversationsJsonlDataset"


def format_general_conversation(row: dict[str, Any], *, where: str) -> dict[str, Any]:
    media = [key for key in MEDIA_KEYS if row.get(key)]
    if media:
        raise DataError(f"{where}: key {media[0]!r}: media in conversations is not supported, only text")
    turns = require_key(row, "conversations", where=where, needed_by=NAME)
    if not isinstance(turns, list):
        raise DataError(f"{where}: conversations must be a list of {{'from', 'value'}} turns")
    messages = []
    for i, turn in enumerate(turns):
        at = f"{where} conversations[{i}]"
        sender = require_key(turn, "from", where=at, needed_by=NAME)
        if sender not in SENDERS:
            raise DataError(f"{at}.from={sender!r}; expected one of {sorted(SENDERS)}")
        messages.append(
            {"role": SENDERS[sender], "content": require_text(turn, "value", where=at, needed_by=NAME)}
        )
    check_conversation(messages, where=where, key="conversations")
    return {"messages": messages}


class GeneralConversationsJsonlDataset:
    def __init__(
        self, data_path: str | None = None, split: str | None = None, config_path: str = "data.train"
    ):
        if not data_path:
            raise DataError(f"{config_path}.data_path is required for {NAME} (a JSONL file or a Hub name)")
        train = read_formatted(
            data_path, partial(format_general_conversation), split=split, config_path=config_path
        )
        self.formatted_ds = {"train": train, "validation": None}
        self.task_spec = TaskDataSpec("general-conversation-jsonl")
