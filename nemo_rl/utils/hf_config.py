"""The model's Hugging Face config with `policy.hf_config_overrides` applied, built before the model.

    config = load_hf_config("Qwen/Qwen2.5-1.5B", overrides={"rope_theta": 1e6})
    model = AutoModelForCausalLM.from_pretrained(name, config=config, ...)

Each override must name an attribute the config already has: a misspelt key would otherwise be
stored on the config and silently change nothing. A mapping given for a nested config (a
multimodal model's `text_config`) is applied to that config key by key.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

CONFIG_KEY = "policy.hf_config_overrides"


def load_hf_config(model_name: str, *, trust_remote_code: bool = False, overrides: Mapping[str, Any] | None = None) -> Any:
    """`AutoConfig.from_pretrained(model_name)` with `overrides` set on it (rules: module doc)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_name, trust_remote_code=trust_remote_code)
    apply_config_overrides(config, overrides or {}, prefix=CONFIG_KEY)
    return config


def load_generation_config(model_name: str, config: Any) -> Any:
    """`model_name`'s generation_config.json, or, where it has none, the generation fields of its
    model config (as `from_pretrained` leaves `model.generation_config`)."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(model_name)
    except OSError:  # no generation_config.json
        return GenerationConfig.from_model_config(config)


def apply_config_overrides(config: Any, overrides: Mapping[str, Any], *, prefix: str) -> None:
    from transformers import PretrainedConfig

    for key, value in overrides.items():
        if not hasattr(config, key):
            known = sorted(k for k in config.to_dict() if not k.startswith("_"))
            raise ValueError(
                f"{prefix}.{key}: {type(config).__name__} has no attribute {key!r}, so the override "
                f"would change nothing; its attributes: {known}"
            )
        current = getattr(config, key)
        if isinstance(current, PretrainedConfig) and isinstance(value, Mapping):
            apply_config_overrides(current, value, prefix=f"{prefix}.{key}")
        else:
            setattr(config, key, value)
