"""openai_format: conversations with tools; PreservingDataset versus Arrow's None-filling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nemo_rl.data.datasets.openai_format import OpenAIFormatDataset
from nemo_rl.data.datasets.preserving import PreservingDataset
from nemo_rl.data.interfaces import DataError, TaskDataSpec
from nemo_rl.data.processors import SFTDataset
from tests.unit.data.data_test_utils import tokenization

REPO = Path(__file__).resolve().parents[4]
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


PATH = str(FIXTURES / "openai_tools.jsonl")


def arguments(row) -> dict:
    return row["messages"][-3]["tool_calls"][0]["function"]["arguments"]


def test_rows_and_tools():
    rows = OpenAIFormatDataset(data_path=PATH).formatted_ds["train"]
    assert len(rows) == 3
    assert rows[0]["tools"][0]["function"]["name"] == "search"
    assert rows[0]["messages"][0] == {
        "role": "system",
        "content": "You are a helpful assistant.",
        "tool_calls": None,
        "tool_call_id": None,
    }


def test_preserving_dataset_keeps_heterogeneous_tool_arguments():
    rows = OpenAIFormatDataset(data_path=PATH, use_preserving_dataset=True).formatted_ds["train"]
    assert isinstance(rows, PreservingDataset)
    assert arguments(rows[0]) == {"query": "llamas"}
    assert arguments(rows[1]) == {"expression": "2+2", "precision": 2}
    assert rows[2] == json.loads((FIXTURES / "openai_tools.jsonl").read_text().splitlines()[2])


def test_default_arrow_loader_none_fills_tool_arguments():
    rows = OpenAIFormatDataset(data_path=PATH).formatted_ds["train"]
    # One Arrow schema for every row: each call gets every argument name seen anywhere.
    assert arguments(rows[0]) == {"query": "llamas", "expression": None, "precision": None}
    assert arguments(rows[1]) == {"query": None, "expression": "2+2", "precision": 2}


def test_none_filled_arguments_reach_the_tokens_preserved_ones_do_not(tokenizer):
    def learned_text(use_preserving_dataset):
        rows = OpenAIFormatDataset(
            data_path=PATH, use_preserving_dataset=use_preserving_dataset
        ).formatted_ds["train"]
        datum = SFTDataset(rows, tokenizer, TaskDataSpec("t"), tokenization(max_seq_length=1024))[0]
        return tokenizer.decode(datum["input_ids"][datum["token_mask"].bool()])

    assert '"arguments": {"query": "llamas"}' in learned_text(True)
    assert '"expression": null' in learned_text(False)


def test_system_key_and_system_prompt(tmp_path):
    path = tmp_path / "chats.jsonl"
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    path.write_text(
        json.dumps({"conversation": chat, "persona": "Be kind."})
        + "\n"
        + json.dumps({"conversation": chat})
        + "\n"
    )
    rows = OpenAIFormatDataset(
        data_path=str(path), chat_key="conversation", system_key="persona", system_prompt="Be brief."
    ).formatted_ds["train"]
    assert [r["messages"][0]["content"] for r in rows] == ["Be kind.", "Be brief."]


def test_last_message_must_be_the_assistants(tmp_path):
    path = tmp_path / "chats.jsonl"
    chat = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
    ]
    path.write_text(json.dumps({"messages": chat[:2]}) + "\n" + json.dumps({"messages": chat}) + "\n")
    with pytest.raises(
        DataError,
        match=rf"{path} line 2: messages\[2\].role='user': the last message must be the assistant's",
    ):
        OpenAIFormatDataset(data_path=str(path))


def test_missing_chat_key(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"conversation": []}) + "\n")
    with pytest.raises(DataError) as error:
        OpenAIFormatDataset(data_path=str(path), config_path="data.validation")
    assert (
        str(error.value)
        == f"data.validation.chat_key='messages' not found in {path} line 1; keys there: ['conversation']"
    )


def test_empty_assistant_turn(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text(
        json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]})
        + "\n"
    )
    with pytest.raises(DataError, match=rf"{path} line 1: messages\[1\]: empty assistant turn"):
        OpenAIFormatDataset(data_path=str(path))


def test_mixed_types_without_preserving_point_to_the_option(tmp_path):
    path = tmp_path / "chats.jsonl"

    def call(args):
        return {
            "messages": [
                {"role": "user", "content": "Go"},
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [{"function": {"name": "f", "arguments": args}}],
                },
                {"role": "tool", "content": "done"},
                {"role": "assistant", "content": "Done."},
            ]
        }

    path.write_text(json.dumps(call({"level": 3})) + "\n" + json.dumps(call({"level": "high"})) + "\n")
    with pytest.raises(DataError, match="use_preserving_dataset=true"):
        OpenAIFormatDataset(data_path=str(path))
    rows = OpenAIFormatDataset(data_path=str(path), use_preserving_dataset=True).formatted_ds["train"]
    assert [arguments(r) for r in rows] == [{"level": 3}, {"level": "high"}]
