"""Generate with a fine-tuned checkpoint: a full model directory, or a PEFT adapter over its base.

    uv run examples/generate.py --checkpoint results/sft_tiny_lora/step_150/hf --prompt "Where was Ada born?"
    uv run examples/generate.py --checkpoint results/sft_tiny/step_150/hf --prompts-file prompts.jsonl
    uv run examples/generate.py --checkpoint results/sft_tiny_lora/step_150/hf_merged \\
        --system "Ada Lovelace was born in London." --prompt "Where was Ada born?" --max-new-tokens 32

A directory with adapter_config.json is a LoRA adapter: its base model (the adapter's
`base_model_name_or_path`, or --base-model) is loaded and the adapter applied with
`peft.PeftModel`. Any other directory is loaded with `AutoModelForCausalLM`.

Prompts are rendered with the chat template of the tokenizer saved in the checkpoint (the one
training used, `policy.tokenizer.chat_template` included) with add_generation_prompt=True,
tokenized like training (no special tokens added by the tokenizer, then BOS unless the
template already rendered it). Decoding is greedy unless --temperature > 0. See docs/generate.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from nemo_rl.models.generation.loading import load_generation_model


def load_model(checkpoint: str, *, base_model: str | None = None, tokenizer_path: str | None = None,
               device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(model in eval mode, tokenizer, description) for a full model or a PEFT adapter directory."""
    from transformers import AutoTokenizer

    if not os.path.isdir(checkpoint):
        raise FileNotFoundError(f"--checkpoint {checkpoint}: no such directory")
    model, base, description = load_generation_model(checkpoint, base_model=base_model, device=device, dtype=dtype)

    # The checkpoint's tokenizer carries the training chat template; the base's may not.
    candidates = [tokenizer_path] if tokenizer_path else [checkpoint, base]
    tokenizer_dir = next((c for c in candidates if c and _has_tokenizer(c)), None)
    if tokenizer_dir is None:
        raise FileNotFoundError(f"no tokenizer in {checkpoint}; pass --tokenizer (the one training used)")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if tokenizer_dir != checkpoint:
        print(f"note: tokenizer from {tokenizer_dir}; its chat template may not be the one training used",
              file=sys.stderr)
    return model, tokenizer, description


def _has_tokenizer(path: str) -> bool:
    if not os.path.isdir(path):
        return True  # a Hub name: let transformers resolve it
    return any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def read_conversations(prompts: list[str], prompts_file: str | None, system: str | None) -> list[list[dict[str, Any]]]:
    """Each prompt as a message list. JSONL rows hold "messages" (a trailing assistant turn is
    dropped: that is what gets generated) or "prompt" (+ optional "system")."""
    rows: list[dict[str, Any]] = [{"prompt": p} for p in prompts]
    if prompts_file:
        with open(prompts_file, encoding="utf-8") as handle:
            for line_no, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{prompts_file} line {line_no}: not JSON ({error})") from None
                if not isinstance(row, dict) or not ({"messages", "prompt"} & set(row)):
                    keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                    raise ValueError(f"{prompts_file} line {line_no}: expected a 'messages' or 'prompt' key; got {keys}")
                if "messages" in row:
                    messages = row["messages"]
                    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
                        raise ValueError(f"{prompts_file} line {line_no}: 'messages' must be a list of {{\"role\": ..., \"content\": ...}} objects")
                    if all(m["role"] == "assistant" for m in messages):
                        raise ValueError(f"{prompts_file} line {line_no}: 'messages' has no turn before the assistant's to answer")
                rows.append(row)
    conversations = []
    for row in rows:
        if "messages" in row:
            messages = list(row["messages"])
            while messages and messages[-1].get("role") == "assistant":
                messages.pop()
        else:
            messages = [{"role": "user", "content": row["prompt"]}]
            if row.get("system"):
                messages.insert(0, {"role": "system", "content": row["system"]})
        if system and not any(m.get("role") == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": system})
        conversations.append(messages)
    return conversations


def encode_prompt(tokenizer, messages: list[dict[str, Any]], *, add_bos: bool = True) -> list[int]:
    """Token ids of `messages` + the generation prompt, tokenized as training tokenizes."""
    if not tokenizer.chat_template:
        raise ValueError("the tokenizer has no chat template; pass --tokenizer with the one training saved")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if add_bos and bos is not None and (not ids or ids[0] != bos):
        ids.insert(0, bos)
    return ids


@torch.no_grad()
def generate(model, tokenizer, conversations, *, max_new_tokens: int = 128, temperature: float = 0.0,
             add_bos: bool = True) -> list[str]:
    """One completion per conversation (greedy when temperature == 0)."""
    device = next(model.parameters()).device
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    outputs = []
    for messages in conversations:
        input_ids = torch.tensor([encode_prompt(tokenizer, messages, add_bos=add_bos)], device=device)
        generated = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            eos_token_id=sorted(eos_ids) or None,
            pad_token_id=pad,
            top_p=None, top_k=None,  # plain greedy / temperature sampling, whatever generation_config says
            **sampling,
        )
        outputs.append(tokenizer.decode(generated[0, input_ids.shape[1]:], skip_special_tokens=True).strip())
    return outputs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a step_<N>/hf or hf_merged directory (or any HF model dir)")
    parser.add_argument("--prompt", action="append", default=[], help="a user message; repeat for several")
    parser.add_argument("--prompts-file", help="JSONL: {\"prompt\": ..., \"system\": ...} or {\"messages\": [...]} per line")
    parser.add_argument("--system", help="a system message for prompts that have none (SQuAD: the context)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    parser.add_argument("--seed", type=int, default=0, help="for --temperature > 0")
    parser.add_argument("--base-model", help="the adapter's base, if not its recorded base_model_name_or_path")
    parser.add_argument("--tokenizer", help="tokenizer directory, if the checkpoint has none")
    parser.add_argument("--no-bos", action="store_true", help="as data.add_bos=false in training")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--output", help="also write {\"messages\", \"output\"} rows to this JSONL file")
    args = parser.parse_args(argv)

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    try:  # what the user fixes (a path, a prompts file) is one line, not a traceback
        conversations = read_conversations(args.prompt, args.prompts_file, args.system)
        if not conversations:
            parser.error("give at least one --prompt or a --prompts-file")
        model, tokenizer, description = load_model(
            args.checkpoint, base_model=args.base_model, tokenizer_path=args.tokenizer,
            device=device, dtype=getattr(torch, args.dtype),
        )
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"# {description} on {device}", flush=True)
    outputs = generate(model, tokenizer, conversations, max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, add_bos=not args.no_bos)
    for i, (messages, output) in enumerate(zip(conversations, outputs), 1):
        print(f"\n[{i}] {messages[-1]['role']}: {messages[-1]['content']}")
        print(f"[{i}] assistant: {output}", flush=True)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as handle:
            for messages, output in zip(conversations, outputs):
                handle.write(json.dumps({"messages": messages, "output": output}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
