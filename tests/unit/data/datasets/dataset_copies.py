"""Small local copies of Hub datasets in their real formats, made from a seed.

Each `write_*` function writes a copy the way the Hub (or `save_to_disk`) lays it out, and returns
the rows it wrote, so tests can compare what a loader produces with the source rows:

- OpenMathInstruct-2: `data/train_1M-00000-of-00001.parquet` (the Hub's file layout, split
  train_1M), the same rows as a `save_to_disk` folder and as a JSONL file; columns problem,
  generated_solution, expected_answer, problem_source.
- tulu-3-sft-mixture: `data/train-00000-of-00001.parquet`; columns id, messages (a list of
  {role, content}), source.
- oasst1: `data/{train,validation}-00000-of-00001.parquet`, one message per row: message_id,
  parent_id, message_tree_id, role (prompter/assistant), text, lang, rank, deleted, review_result.
- general conversations: one JSONL file of {"conversations": [{"from", "value"}, ...]}.

Run `python tests/unit/data/datasets/dataset_copies.py OUT_DIR` to write them all under OUT_DIR.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

WORDS = "the a river stone light quiet number seven garden paper window north tall river blue".split()


def _sentence(rng: random.Random, n: int = 6) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def _write_parquet(rows: list[dict[str, Any]], path: Path) -> None:
    import datasets

    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows).to_parquet(str(path))


def openmathinstruct2_rows(n: int = 12, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        rows.append(
            {
                "problem": f"What is ${a} + {b}$?",
                "generated_solution": f"Adding {a} and {b} gives {a + b}.\n\nThe answer is $\\boxed{{{a + b}}}$.",
                "expected_answer": str(a + b),
                "problem_source": rng.choice(["augmented_math", "augmented_gsm8k", "math", "gsm8k"]),
            }
        )
    return rows


def write_openmathinstruct2(root: Path, seed: int = 0) -> list[dict[str, Any]]:
    """root/hub (Hub file layout), root/saved (save_to_disk of the train_1M split), root/rows.jsonl."""
    import datasets

    rows = openmathinstruct2_rows(seed=seed)
    _write_parquet(rows, root / "hub" / "data" / "train_1M-00000-of-00001.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(root / "saved"))
    (root / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rows


def tulu3_rows(n: int = 8, seed: int = 1) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        messages = []
        if i % 3 == 0:
            messages.append({"role": "system", "content": _sentence(rng)})
        for _ in range(1 + i % 2):  # one or two exchanges
            messages += [
                {"role": "user", "content": _sentence(rng)},
                {"role": "assistant", "content": _sentence(rng)},
            ]
        rows.append(
            {"id": f"tulu_{i}", "messages": messages, "source": rng.choice(["flan", "wildchat", "oasst"])}
        )
    return rows


def write_tulu3(root: Path, seed: int = 1) -> list[dict[str, Any]]:
    rows = tulu3_rows(seed=seed)
    _write_parquet(rows, root / "data" / "train-00000-of-00001.parquet")
    return rows


def oasst_messages(seed: int = 2) -> dict[str, list[dict[str, Any]]]:
    """Two train trees and one validation tree.

    Train tree t1 (lang en):            Train tree t2 (lang de):
      p1 prompter                         p4 prompter
      |- a1 assistant rank 0                 |- a4 assistant
      |  |- p2 prompter
      |  |  |- a3 assistant
      |- a2 assistant rank 1
      |  |- p3 prompter (no answer)
      |- a5 assistant, deleted
         |- p5 prompter (reply to a deleted message)
    """
    rng = random.Random(seed)

    def message(mid, parent, tree, role, *, lang="en", rank=None, deleted=False, review_result=True):
        return {
            "message_id": mid,
            "parent_id": parent,
            "message_tree_id": tree,
            "role": role,
            "text": f"[{mid}] {_sentence(rng)}",
            "lang": lang,
            "rank": rank,
            "deleted": deleted,
            "review_result": review_result,
        }

    train = [
        message("p1", None, "t1", "prompter"),
        message("a2", "p1", "t1", "assistant", rank=1),  # listed before a1: rank decides the order
        message("a1", "p1", "t1", "assistant", rank=0),
        message("p2", "a1", "t1", "prompter"),
        message("a3", "p2", "t1", "assistant"),
        message("p3", "a2", "t1", "prompter"),
        message("a5", "p1", "t1", "assistant", rank=2, deleted=True),
        message("p5", "a5", "t1", "prompter"),
        message("p4", None, "t2", "prompter", lang="de"),
        message("a4", "p4", "t2", "assistant", lang="de"),
    ]
    validation = [message("p6", None, "t3", "prompter"), message("a6", "p6", "t3", "assistant")]
    return {"train": train, "validation": validation}


def write_oasst(root: Path, seed: int = 2) -> dict[str, list[dict[str, Any]]]:
    splits = oasst_messages(seed)
    for split, rows in splits.items():
        _write_parquet(rows, root / "data" / f"{split}-00000-of-00001.parquet")
    return splits


def general_conversation_rows(seed: int = 3) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [
        {
            "conversations": [
                {"from": "human", "value": _sentence(rng)},
                {"from": "gpt", "value": _sentence(rng)},
            ]
        },
        {
            "conversations": [
                {"from": "system", "value": _sentence(rng)},
                {"from": "user", "value": _sentence(rng)},
                {"from": "assistant", "value": _sentence(rng)},
                {"from": "human", "value": _sentence(rng)},
                {"from": "agent", "value": _sentence(rng)},
            ]
        },
    ]


def write_general_conversations(path: Path, seed: int = 3) -> list[dict[str, Any]]:
    rows = general_conversation_rows(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rows


def write_all(out: Path) -> None:
    write_openmathinstruct2(out / "OpenMathInstruct-2")
    write_tulu3(out / "tulu-3-sft-mixture")
    write_oasst(out / "oasst1")
    write_general_conversations(out / "general_conversations.jsonl")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/unit/data/datasets/dataset_copies.py OUT_DIR")
    write_all(Path(sys.argv[1]))
