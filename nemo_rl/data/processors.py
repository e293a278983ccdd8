"""Chat rows -> token ids and a per-token loss mask (`sft_processor`), and the SFTDataset of them.

How rows become tokens is one `TokenizationOptions`, built once from the config:

    options = TokenizationOptions.from_config(cfg)   # each field names the config key it comes from
    dataset = SFTDataset(rows, tokenizer, task_spec, options)

How the mask is computed. The chat template renders the conversation up to each assistant turn a
that carries loss (all of them, or only the last with `only_unmask_final`):

    start_a = render(messages[:a], add_generation_prompt=data.add_generation_prompt)
    end_a   = render(messages[:a + 1])

Each of these strings must be a prefix of the next one and of the whole rendering; a template for
which this fails (one that rewrites earlier turns once later ones exist) is reported, never
guessed at. The characters between start_a and end_a are assistant a's: its content, its
end-of-turn token, and its header unless `add_generation_prompt` moved the header into start_a.
Everything else is prompt.

The whole rendering is then tokenized once, so the ids are exactly the tokenizer's ids for that
text, and each token is attributed by its character offsets: a token carries loss when any of its
characters belongs to a trained assistant turn (a token that straddles the boundary, which only
happens when a template joins prompt and answer inside one word, goes to the answer, so no answer
character is ever left unlearned). Tokenizers without offsets (slow, pure-Python ones) tokenize
each piece on its own instead.

BOS/EOS: the text is tokenized with add_special_tokens=False (a post-processor would otherwise add
a second BOS to a template that renders one); `add_bos` then prepends BOS unless the template
already rendered it, and `add_eos` appends EOS unless the rendering already ends with it. An
appended EOS carries loss when the conversation ends with a trained assistant turn.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import torch

from nemo_rl.config.schema import MasterConfig
from nemo_rl.data.datasets.common import check_conversation
from nemo_rl.data.datasets.mixture import MixedRows
from nemo_rl.data.interfaces import DataError, DatumSpec, TaskDataSpec

Overlength = Literal["mask", "truncate", "drop"]
OVERLENGTH_MODES = ("mask", "truncate", "drop")
CONFIG_KEY = "config_key"  # the metadata entry of each TokenizationOptions field


def _from_config(key: str) -> Any:
    return field(metadata={CONFIG_KEY: key})


@dataclass(frozen=True)
class TokenizationOptions:
    """Everything that decides how a chat row becomes token ids and a loss mask.

    Each field names the (dotted) config key it is read from, so that `from_config` builds it and
    the resume check (`nemo_rl.algorithms.resume.data_fingerprint`) compares it key by key: a field
    added here is read from the config and guarded against a changed resume with no other edit.
    `tokenizer` and `chat_template` are the config's choices, which `get_tokenizer` applies to the
    tokenizer object; the processor reads the rest.
    """

    tokenizer: str = _from_config("policy.tokenizer.name")
    chat_template: str | None = _from_config("policy.tokenizer.chat_template")
    chat_template_kwargs: dict[str, Any] | None = _from_config("policy.tokenizer.chat_template_kwargs")
    add_bos: bool = _from_config("data.add_bos")
    add_eos: bool = _from_config("data.add_eos")
    add_generation_prompt: bool = _from_config("data.add_generation_prompt")
    answer_only_loss_mask: bool = _from_config("data.answer_only_loss_mask")
    only_unmask_final: bool = _from_config("sft.only_unmask_final")
    max_seq_length: int = _from_config("data.max_input_seq_length")
    overlength: Overlength = _from_config("data.overlength")

    def __post_init__(self) -> None:
        if self.overlength not in OVERLENGTH_MODES:
            raise ValueError(f"data.overlength={self.overlength!r}; expected one of {list(OVERLENGTH_MODES)}")

    @classmethod
    def from_config(cls, cfg: MasterConfig) -> TokenizationOptions:
        def read(key: str) -> Any:  # "data.add_bos" -> cfg.data.add_bos
            return functools.reduce(getattr, key.split("."), cfg)

        return cls(**{f.name: read(f.metadata[CONFIG_KEY]) for f in fields(cls)})

    def by_config_key(self) -> dict[str, Any]:
        """{config key: value} for every field, e.g. {"data.add_bos": True, ...}."""
        return {f.metadata[CONFIG_KEY]: getattr(self, f.name) for f in fields(self)}


@dataclass
class TokenizedConversation:
    input_ids: list[int]
    token_mask: list[int]  # 1 where the token is a prediction target
    # Per token: the index of the trained assistant message it belongs to, None for prompt tokens.
    token_owner: list[int | None]


class TemplateError(DataError):
    """The chat template cannot be used to attribute tokens to messages."""


def tokenize_conversation(
    messages: list[dict[str, Any]],
    tokenizer,
    options: TokenizationOptions,
    *,
    tools: list[dict[str, Any]] | None = None,
    where: str = "row",
) -> TokenizedConversation:
    """Token ids of `messages` rendered by `tokenizer.chat_template`, and their loss mask (no length limit)."""
    n = len(messages)
    add_generation_prompt = options.add_generation_prompt
    assistants = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
    if not options.answer_only_loss_mask:
        trained = []  # every token is trained: no turn's boundaries are needed, so none is rendered
    elif options.only_unmask_final:
        trained = assistants[-1:]
    else:
        trained = assistants
    kwargs = dict(options.chat_template_kwargs or {})

    # The renderings needed: messages[:a] (with the generation prompt when asked) and messages[:a + 1]
    # for each trained turn a, and the whole conversation.
    plain_ends = sorted({a + 1 for a in trained} | {n} | (set() if add_generation_prompt else set(trained)))
    plain = _render(tokenizer, messages, plain_ends, tools, False, kwargs, where)
    starts = (
        _render(tokenizer, messages, trained, tools, True, kwargs, where) if add_generation_prompt else plain
    )

    # Character ranges [start, end) of the trained assistant turns in the full rendering.
    turns: list[tuple[int, int, int]] = []
    done, done_at = "", "the start"
    for a in trained:
        start, end = starts[a], plain[a + 1]
        start_at = f"messages[:{a}]" + (" with add_generation_prompt" if add_generation_prompt else "")
        _require_prefix(done, done_at, start, start_at, where)
        if not end.startswith(start):
            if add_generation_prompt:
                raise TemplateError(
                    f"{where}: the chat template's generation prompt after messages[:{a}] is not how it "
                    f"starts messages[{a}] (the assistant's turn): {start[len(done) :]!r} vs "
                    f"{end[len(done) :]!r}; set data.add_generation_prompt=false"
                )
            _require_prefix(start, start_at, end, f"messages[:{a + 1}]", where)
        if len(end) == len(start):
            raise DataError(
                f"{where}: the chat template renders nothing for messages[{a}] (role 'assistant'), so "
                "the turn would carry no loss; check that the template renders assistant messages"
            )
        turns.append((len(start), len(end), a))
        done, done_at = end, f"messages[:{a + 1}]"
    full = plain[n]
    _require_prefix(done, done_at, full, f"messages[:{n}]", where)

    if getattr(tokenizer, "is_fast", False):
        input_ids, owners = _encode_with_offsets(tokenizer, full, turns)
    else:
        input_ids, owners = _encode_pieces(tokenizer, full, turns)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if options.add_bos and bos is not None and (not input_ids or input_ids[0] != bos):
        input_ids.insert(0, bos)
        owners.insert(0, None)
    if options.add_eos and eos is not None and (not input_ids or input_ids[-1] != eos):
        input_ids.append(eos)
        owners.append(n - 1 if trained and trained[-1] == n - 1 else None)
    if options.answer_only_loss_mask:
        token_mask = [0 if owner is None else 1 for owner in owners]
    else:  # every token is a target but the first, which nothing precedes
        token_mask = [0] + [1] * (len(input_ids) - 1)
    return TokenizedConversation(input_ids, token_mask, owners)


def encode_generation_prompt(
    messages: list[dict[str, Any]],
    tokenizer,
    options: TokenizationOptions,
    *,
    tools: list[dict[str, Any]] | None = None,
) -> list[int]:
    """Token ids of `messages` rendered with the generation prompt (what a model continues
    to answer them), tokenized as `tokenize_conversation` tokenizes: no special tokens from the
    tokenizer, then BOS (`options.add_bos`) unless the template rendered it."""
    (text,) = _render(
        tokenizer, messages, [len(messages)], tools, True, dict(options.chat_template_kwargs or {}), "prompt"
    ).values()
    input_ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = tokenizer.bos_token_id
    if options.add_bos and bos is not None and (not input_ids or input_ids[0] != bos):
        input_ids.insert(0, bos)
    return input_ids


def _encode_with_offsets(tokenizer, text: str, turns: list[tuple[int, int, int]]):
    """Ids of `text`, and for each token the assistant turn it belongs to (None: prompt)."""
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    owners: list[int | None] = []
    turn = 0
    for token_start, token_end in encoding["offset_mapping"]:
        if token_end == token_start:
            # An empty span: a whitespace token whose offsets were trimmed (byte-level
            # trim_offsets) down to where it ends; its characters lie just before.
            token_start, token_end = max(token_end - 1, 0), max(token_end, 1)
        while turn < len(turns) and turns[turn][1] <= token_start:
            turn += 1
        owner = None
        if turn < len(turns) and token_start < turns[turn][1] and token_end > turns[turn][0]:
            owner = turns[turn][2]  # any character of the turn in the token
        owners.append(owner)
    return list(encoding["input_ids"]), owners


def _encode_pieces(tokenizer, text: str, turns: list[tuple[int, int, int]]):
    """Without offsets: the prompt and assistant pieces of `text` tokenized one by one."""
    pieces: list[tuple[str, int | None]] = []
    cursor = 0
    for turn_start, turn_end, message in turns:
        pieces += [(text[cursor:turn_start], None), (text[turn_start:turn_end], message)]
        cursor = turn_end
    pieces = [(piece, owner) for piece, owner in (*pieces, (text[cursor:], None)) if piece]
    encoded = tokenizer([piece for piece, _ in pieces], add_special_tokens=False)["input_ids"]
    input_ids: list[int] = []
    owners: list[int | None] = []
    for ids, (_, owner) in zip(encoded, pieces, strict=True):
        input_ids += ids
        owners += [owner] * len(ids)
    return input_ids, owners


def _render(tokenizer, messages, ends, tools, add_generation_prompt, kwargs, where) -> dict[int, str]:
    """{end: the rendering of messages[:end]} for each end, in one batched call."""
    if not ends:
        return {}
    try:
        texts = tokenizer.apply_chat_template(
            [messages[:end] for end in ends],
            tools=tools or None,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
            **kwargs,
        )
    except Exception as error:  # jinja's raise_exception, undefined variables, bad message shapes
        raise DataError(
            f"{where}: the chat template failed on this conversation: {type(error).__name__}: {error}"
        ) from error
    return dict(zip(ends, texts, strict=True))


def _require_prefix(prefix: str, prefix_at: str, text: str, text_at: str, where: str) -> None:
    if not text.startswith(prefix):
        at = next(
            (i for i, (x, y) in enumerate(zip(prefix, text, strict=False)) if x != y),
            min(len(prefix), len(text)),
        )
        raise TemplateError(
            f"{where}: the chat template does not render conversations prefix-stably: the rendering of {text_at} "
            f"does not start with the rendering of {prefix_at} (they differ at character {at}: "
            f"{prefix[at : at + 40]!r} vs {text[at : at + 40]!r}). Tokens cannot be attributed to messages, so the "
            "loss mask would be wrong; use a template that renders earlier turns the same whatever follows "
            "(or sft.only_unmask_final=true, which needs this only at the final turn)"
        )


# ---------------------------------------------------------------- one row -> one datum


def apply_task_spec(messages: list[dict[str, Any]], task_spec: TaskDataSpec) -> list[dict[str, Any]]:
    """The prompt format applied to each user message, the system prompt added when there is none."""
    if task_spec.prompt:
        messages = [
            {**m, "content": task_spec.prompt.format(m["content"])}
            if m["role"] == "user" and isinstance(m.get("content"), str)
            else m
            for m in messages
        ]
    if task_spec.system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": task_spec.system_prompt}, *messages]
    return messages


def sft_processor(
    row: dict[str, Any],
    tokenizer,
    task_spec: TaskDataSpec,
    options: TokenizationOptions,
    *,
    idx: int,
    where: str = "row",
) -> DatumSpec | None:
    """One formatted row -> a DatumSpec, or None when `options.overlength` drops it."""
    if not isinstance(row, dict) or "messages" not in row:
        keys = list(row) if isinstance(row, dict) else type(row).__name__
        raise DataError(f"{where}: a formatted row needs a 'messages' list; keys there: {keys}")
    messages = row["messages"]
    check_conversation(messages, where=where)
    messages = apply_task_spec(messages, task_spec)
    tokenized = tokenize_conversation(messages, tokenizer, options, tools=row.get("tools"), where=where)
    input_ids, token_mask = tokenized.input_ids, tokenized.token_mask
    loss_multiplier, outcome = 1.0, None
    max_seq_length = options.max_seq_length
    if len(input_ids) > max_seq_length:
        if options.overlength == "drop":
            return None
        input_ids, token_mask = input_ids[:max_seq_length], token_mask[:max_seq_length]
        if options.overlength == "mask":
            loss_multiplier, outcome = 0.0, "masked"
        elif not any(token_mask):  # truncate cut away every assistant token
            return None
        else:
            outcome = "truncated"
    return DatumSpec(
        input_ids=torch.tensor(input_ids, dtype=torch.int64),
        token_mask=torch.tensor(token_mask, dtype=torch.int64),
        length=len(input_ids),
        loss_multiplier=loss_multiplier,
        idx=idx,
        task_name=task_spec.task_name,
        overlength=outcome,
    )


PROCESSORS = {"sft_processor": sft_processor}


def check_processor_name(name: str, config_key: str) -> None:
    if name not in PROCESSORS:
        raise DataError(f"{config_key}={name!r} is not a known processor; known: {sorted(PROCESSORS)}")


# ---------------------------------------------------------------- the dataset the loader samples


class SFTDataset(torch.utils.data.Dataset):
    """Tokenized samples of `rows`, all processed at construction so bad data fails before training.

    `overlength_counts` says how many samples were longer than `options.max_seq_length` and what happened:
    {"truncated": n, "masked": n, "dropped": n}. Dropped samples are left out, so indices run
    over the kept ones; each datum's `idx` is its row's index in `rows`.
    """

    def __init__(
        self,
        rows,
        tokenizer,
        task_spec: TaskDataSpec,
        options: TokenizationOptions,
        *,
        source: str = "train",
        processor: str = "sft_processor",
    ):
        check_processor_name(processor, f"data.{source}.processor")
        _check_prompt_format(task_spec)
        if isinstance(rows, MixedRows):  # each row with its own dataset's prompt and processor
            for part in rows.parts:
                check_processor_name(part.processor, f"{part.config_path}.processor")
                _check_prompt_format(part.task_spec)
        self._rows = rows  # for `conversation`: the messages behind a sample
        self.task_spec = task_spec
        self.options = options
        self.samples: list[DatumSpec] = []
        self.overlength_counts = {"truncated": 0, "masked": 0, "dropped": 0}
        for idx, row in enumerate(rows.to_list() if hasattr(rows, "to_list") else rows):
            row_spec, process, where = self._task_of(idx), PROCESSORS[processor], f"{source} row {idx}"
            if isinstance(rows, MixedRows):
                part = rows.part_of(idx)
                process = PROCESSORS[part.processor]
                where = f"{where} ({part.config_path}, dataset_name={part.dataset_name!r})"
            datum = process(row, tokenizer, row_spec, options, idx=idx, where=where)
            if datum is None:
                self.overlength_counts["dropped"] += 1
                continue
            if datum["overlength"] is not None:
                self.overlength_counts[datum["overlength"]] += 1
            self.samples.append(datum)
        if not self.samples and not self.overlength_counts["dropped"]:
            raise DataError(f"{source}: no rows to train or validate on")
        if not self.samples:
            raise DataError(
                f"{source}: all {self.overlength_counts['dropped']} samples were dropped as longer than "
                f"max_seq_length={options.max_seq_length} (data.overlength={options.overlength!r}); "
                "raise the length limit"
            )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> DatumSpec:
        return self.samples[index]

    def conversation(self, index: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
        """Sample `index`'s messages as the processor tokenized them (the task's prompt format
        and system prompt applied), and its tools."""
        idx = self.samples[index]["idx"]
        row = self._rows[idx]
        return apply_task_spec(row["messages"], self._task_of(idx)), row.get("tools")

    def source_row(self, index: int) -> dict[str, Any]:
        """Sample `index`'s formatted row as its dataset made it: the messages before any task
        spec, and the other keys it keeps (e.g. squad's `gold_answers`)."""
        return self._rows[self.samples[index]["idx"]]

    def _task_of(self, idx: int) -> TaskDataSpec:
        """The task spec of row `idx`: its dataset's in a mixture, else the one given."""
        if isinstance(self._rows, MixedRows):
            return self._rows.part_of(idx).task_spec
        return self.task_spec


def _check_prompt_format(task_spec: TaskDataSpec) -> None:
    if task_spec.prompt is None:
        return
    try:
        task_spec.prompt.format("x")
    except (IndexError, KeyError, ValueError) as error:
        raise DataError(
            f"prompt_file={task_spec.prompt_file!r} must be a Python format string with one '{{}}' for the user "
            f"message (write literal braces as '{{{{' and '}}}}'): {type(error).__name__}: {error}"
        ) from error
