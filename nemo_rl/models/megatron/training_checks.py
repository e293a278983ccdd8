"""What the driver checks of a Megatron run before any worker starts."""

from __future__ import annotations

import importlib.util

from nemo_rl.config.schema import PolicyConfig
from nemo_rl.utils.hf_config import load_hf_config


def check_megatron_policy(policy_cfg: PolicyConfig) -> None:
    """megatron-core is installed, and the model maps onto the Megatron layout (family, heads,
    layers and FFN divisible by the tensor / pipeline sizes). Raises ValueError naming the key."""
    if importlib.util.find_spec("megatron.core") is None:
        raise ValueError(
            "policy.megatron_cfg.enabled=true needs megatron-core, which is not installed: "
            "`uv sync --extra megatron` (or train with the DTensor backend)"
        )
    from nemo_rl.models.megatron.model_builder import transformer_config_from_hf

    mcfg = policy_cfg.megatron_cfg
    hf_config = load_hf_config(
        policy_cfg.model_name, trust_remote_code=policy_cfg.trust_remote_code, overrides=policy_cfg.hf_config_overrides
    )
    try:
        transformer_config_from_hf(
            hf_config,
            tensor_parallel_size=mcfg.tensor_model_parallel_size,
            pipeline_model_parallel_size=mcfg.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=mcfg.virtual_pipeline_model_parallel_size,
            context_parallel_size=mcfg.context_parallel_size,
        )
    except ValueError as error:
        raise ValueError(f"policy.megatron_cfg with policy.model_name={policy_cfg.model_name}: {error}") from None
