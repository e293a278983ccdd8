"""A checkpoint directory to a model in eval mode: a full model, or a PEFT adapter over its base.

A directory with adapter_config.json is a LoRA adapter: its base model (the adapter's
`base_model_name_or_path`, or `base_model`) is loaded and the adapter applied with
`peft.PeftModel`. Any other directory (or Hub name) is loaded with `AutoModelForCausalLM`.
"""

from __future__ import annotations

import json
import os

import torch

ADAPTER_CONFIG = "adapter_config.json"

# How the caller names its inputs in error messages: command-line flags or config keys.
CLI_NAMES = {"checkpoint": "--checkpoint", "base_model": "--base-model"}


def is_local_path(name: str) -> bool:
    """Whether `name` means a local directory rather than a Hub id ("org/model"): it exists, or
    it starts with "." or "/", or it has more than one "/"."""
    return os.path.exists(name) or name.startswith((".", "/")) or name.count("/") > 1


def is_adapter_dir(checkpoint: str) -> bool:
    return os.path.isfile(os.path.join(checkpoint, ADAPTER_CONFIG))


def adapter_base(checkpoint: str, base_model: str | None, names: dict[str, str] = CLI_NAMES) -> str:
    """The base model an adapter directory applies to: `base_model`, else the recorded one."""
    adapter_file = os.path.join(checkpoint, ADAPTER_CONFIG)
    with open(adapter_file, encoding="utf-8") as handle:
        recorded_base = json.load(handle).get("base_model_name_or_path")
    base = base_model or recorded_base
    if not base:
        raise ValueError(f"{adapter_file} names no base_model_name_or_path; pass {names['base_model']}")
    return base


def load_generation_model(
    checkpoint: str,
    *,
    base_model: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    names: dict[str, str] = CLI_NAMES,
):
    """(model in eval mode on `device`, base model path or None, description)."""
    from transformers import AutoModelForCausalLM

    local = is_local_path(checkpoint)
    if local and not os.path.isdir(checkpoint):
        raise FileNotFoundError(f"{names['checkpoint']} {checkpoint}: no such directory")
    if local and is_adapter_dir(checkpoint):
        from peft import PeftModel

        base = adapter_base(checkpoint, base_model, names)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
        model = PeftModel.from_pretrained(model, checkpoint)
        description = f"LoRA adapter {checkpoint} over {base}"
    else:
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype)
        base = None
        description = f"model {checkpoint}"
    return model.to(device).eval(), base, description
