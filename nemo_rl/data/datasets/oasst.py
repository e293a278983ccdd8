"""OpenAssistant (`OpenAssistant/oasst1`, `OpenAssistant/oasst2`): message trees -> linear chats.

The Hub datasets hold one message per row: `message_id`, `parent_id` (None at a tree's root, the
prompter's first message), `role` ("prompter" or "assistant"), `text`, and metadata such as
`lang`, `rank`, `deleted` and `review_result`. Every path from a root to a leaf of a tree is one
conversation, as in NeMo RL: prompter -> user, assistant -> assistant. A path that ends with a
prompter message is cut after its last assistant message (a path with no assistant message is
skipped), and a cut path equal to one already taken is taken once. Messages marked `deleted` or
failing review (`review_result` false), and their replies, are left out. Siblings are visited in
`rank` order (unranked last, then file order), so the rows come out the same every time.

The train split becomes `train`, the validation split (when the source has one) `validation`.
`lang` (in `kwargs`) keeps the trees whose root message is in that language, e.g. "en".
"""

from __future__ import annotations

from typing import Any

from nemo_rl.data.datasets.common import as_rows, check_conversation, read_columns, require_text
from nemo_rl.data.datasets.local_files import load_hf_dataset, looks_local
from nemo_rl.data.interfaces import DataError, TaskDataSpec

HUB_ID = "OpenAssistant/oasst1"
NAME = "open_assistant"
ROLES = {"prompter": "user", "assistant": "assistant"}
COLUMNS = {
    "message_id": "the message's id",
    "parent_id": "the id of the message it answers",
    "role": "prompter or assistant",
    "text": "the message",
}


def linear_conversations(
    located: list[tuple[str, dict[str, Any]]], *, lang: str | None = None
) -> list[dict[str, Any]]:
    """The root-to-leaf conversations of the message trees in `located` ((where, row) pairs)."""
    rows_by_id: dict[str, tuple[int, str, dict[str, Any]]] = {}
    for order, (where, row) in enumerate(located):
        if row["message_id"] in rows_by_id:
            raise DataError(f"{where}: message_id {row['message_id']!r} appears twice")
        if row.get("deleted") is True or row.get("review_result") is False:
            continue
        role = row["role"]
        if role not in ROLES:
            raise DataError(f"{where}: role={role!r}, expected one of {list(ROLES)}")
        rows_by_id[row["message_id"]] = (order, where, row)
    children: dict[str | None, list[str]] = {}
    for message_id, (_, _, row) in rows_by_id.items():
        children.setdefault(row["parent_id"], []).append(message_id)

    def sibling_order(message_id: str) -> tuple[int, float, int]:
        order, _, row = rows_by_id[message_id]
        rank = row.get("rank")
        return (rank is None, rank if rank is not None else 0, order)

    conversations: list[dict[str, Any]] = []
    seen: set[tuple[str, ...]] = set()

    def walk(message_id: str, path: list[str]) -> None:
        path = [*path, message_id]
        replies = sorted(children.get(message_id, []), key=sibling_order)
        if replies:
            for reply in replies:
                walk(reply, path)
            return
        while path and rows_by_id[path[-1]][2]["role"] != "assistant":
            path = path[:-1]  # a conversation ends with the assistant's answer
        if not path or tuple(path) in seen:
            return
        seen.add(tuple(path))
        messages = []
        for mid in path:
            _, where, row = rows_by_id[mid]
            messages.append(
                {
                    "role": ROLES[row["role"]],
                    "content": require_text(row, "text", where=where, needed_by=NAME),
                }
            )
        check_conversation(messages, where=rows_by_id[path[-1]][1], require_final_assistant=True)
        conversations.append({"messages": messages})

    for root in sorted(children.get(None, []), key=sibling_order):
        root_row = rows_by_id[root][2]
        if lang is not None and root_row.get("lang") != lang:
            continue
        if root_row["role"] != "prompter":
            raise DataError(
                f"{rows_by_id[root][1]}: a tree's root message must be the prompter's, got role {root_row['role']!r}"
            )
        walk(root, [])
    return conversations


class OasstDataset:
    def __init__(self, data_path: str = HUB_ID, lang: str | None = None, config_path: str = "data.train"):
        if looks_local(data_path) and data_path.endswith((".jsonl", ".json")):
            splits = ["train"]  # a single file is one split
        else:
            splits = [
                s
                for s in ("train", "validation")
                if s in load_hf_dataset(data_path, split=None, config_path=config_path)
            ]
        self.formatted_ds: dict[str, Any] = {"train": None, "validation": None}
        for split in splits:
            located = read_columns(
                data_path, COLUMNS, split=split, dataset_name=NAME, config_path=config_path
            )
            conversations = linear_conversations(located, lang=lang)
            if not conversations and split == "validation":
                continue  # e.g. no validation tree in `lang`: no validation rows from this source
            if not conversations:
                raise DataError(
                    f"{config_path}.data_path={data_path!r} split {split!r}: no conversation with an assistant "
                    f"message" + (f" in lang={lang!r}" if lang else "")
                )
            self.formatted_ds[split] = as_rows(conversations, config_path=config_path)
        if self.formatted_ds["train"] is None:
            raise DataError(f"{config_path}.data_path={data_path!r} has no 'train' split")
        self.task_spec = TaskDataSpec(NAME)
