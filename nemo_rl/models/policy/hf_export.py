"""Write a complete Hugging Face model directory from a full (unsharded) state dict.

The result loads with `AutoModelForCausalLM.from_pretrained(path)` and no conversion:
config.json, model.safetensors (or shards plus model.safetensors.index.json past
`max_shard_size`), generation_config.json, and the modelling code of a remote-code model.

Transformers' own `save_pretrained` does the writing, called on a weightless (meta-device)
skeleton of the architecture with the real tensors passed as `state_dict`, so key names,
dropping of tied duplicates and sharding follow exactly HF's conventions for that model.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, PretrainedConfig


def save_hf_checkpoint(
    state_dict: dict[str, torch.Tensor],
    path: str,
    *,
    config: PretrainedConfig,
    generation_config: GenerationConfig | None = None,
    trust_remote_code: bool = False,
    tied_keys: dict[str, str] | None = None,
    max_shard_size: str | int = "5GB",
) -> None:
    """Writes `state_dict` (HF key names, CPU tensors) as an HF model directory at `path`.

    `tied_keys` maps an alias key to the key whose tensor it shares in the live model
    (e.g. lm_head.weight -> model.embed_tokens.weight); aliases are made to point at the
    same tensor so that HF stores the tied weight once, as `from_pretrained` expects.
    """
    state_dict = dict(state_dict)
    for alias, source in (tied_keys or {}).items():
        if alias in state_dict and source in state_dict:
            state_dict[alias] = state_dict[source]
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    if generation_config is not None:
        skeleton.generation_config = generation_config
    skeleton.save_pretrained(path, state_dict=state_dict, max_shard_size=max_shard_size)


def shared_parameter_aliases(model: torch.nn.Module) -> dict[str, str]:
    """{alias: first name} for parameters registered under more than one name (tied weights)."""
    first_name: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first_name:
            aliases[name] = first_name[id(param)]
        else:
            first_name[id(param)] = name
    return aliases
