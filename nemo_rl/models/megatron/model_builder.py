"""megatron-core's `GPTModel` built from a Hugging Face causal-LM config.

`transformer_config_from_hf` maps the HF config onto megatron-core's `TransformerConfig`, refusing
what the mapping cannot reproduce exactly (a family or feature it does not know); `build_gpt_model`
builds one model chunk (one pipeline stage, or one virtual stage) from it. Weights are not loaded
here: `hf_conversion.load_hf_weights_into` does that.

Supported families (`hf_config.model_type`): llama (Llama 2, 3, 3.1, 3.2 incl. Llama-3 RoPE
scaling), qwen2 (q/k/v bias), qwen3 (q/k RMSNorm), mistral (without sliding window). All share one
shape: pre-norm decoder layers, RMSNorm, SwiGLU MLP, rotary embeddings, grouped-query attention.

Vocabulary padding: megatron-core splits the vocabulary rows evenly across tensor-parallel ranks,
so the embedding and output layer hold `padded_vocab_size(vocab_size, tp)` rows: the vocabulary
rounded up to a multiple of the TP size (unchanged when it divides, as for every released Llama,
Qwen and Mistral vocabulary). Padding rows are zero; logits past `hf_config.vocab_size` are not
tokens and must be dropped by the caller.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")


class UnsupportedHFModelError(ValueError):
    """The HF config names a family or a feature the Megatron mapping cannot reproduce exactly."""


def padded_vocab_size(vocab_size: int, tensor_parallel_size: int) -> int:
    """Rows of the Megatron embedding and output layer: `vocab_size` rounded up to a multiple of
    the tensor-parallel size."""
    return math.ceil(vocab_size / tensor_parallel_size) * tensor_parallel_size


def _refuse(hf_config, feature: str) -> None:
    raise UnsupportedHFModelError(
        f"model_type={hf_config.model_type!r}: {feature} is not supported by the Megatron backend "
        f"(nemo_rl/models/megatron/model_builder.py); use the DTensor backend (policy.dtensor_cfg) for this model"
    )


def _rope_parameters(hf_config) -> dict[str, Any]:
    """RoPE settings, whichever way the transformers version spells them (v5: `rope_parameters`)."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    legacy_scaling = getattr(hf_config, "rope_scaling", None)
    if not params and legacy_scaling:
        params = dict(legacy_scaling)
    if "rope_theta" not in params:
        params["rope_theta"] = getattr(hf_config, "rope_theta", 10000.0)
    params.setdefault("rope_type", params.pop("type", "default") or "default")
    return params


def head_dim(hf_config) -> int:
    explicit = getattr(hf_config, "head_dim", None)
    return explicit if explicit else hf_config.hidden_size // hf_config.num_attention_heads


def _check_supported(hf_config, tensor_parallel_size: int) -> None:
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedHFModelError(
            f"model_type={model_type!r} is not supported by the Megatron backend; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (nemo_rl/models/megatron/model_builder.py). "
            f"Use the DTensor backend (policy.dtensor_cfg) for this model"
        )
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        _refuse(hf_config, f"hidden_act={hf_config.hidden_act!r} (only 'silu', i.e. SwiGLU)")
    if getattr(hf_config, "mlp_bias", False):
        _refuse(hf_config, "mlp_bias=True")
    if model_type == "llama" and getattr(hf_config, "attention_bias", False):
        _refuse(hf_config, "attention_bias=True")
    if model_type == "qwen3" and getattr(hf_config, "attention_bias", False):
        _refuse(hf_config, "attention_bias=True")
    if model_type in ("qwen2", "qwen3") and getattr(hf_config, "use_sliding_window", False):
        _refuse(hf_config, "use_sliding_window=True")
    if model_type == "mistral" and getattr(hf_config, "sliding_window", None) is not None:
        # Equal to full attention only for sequences no longer than the window; refusing keeps
        # the logits exact for every length. Set sliding_window: null in config.json to use it.
        _refuse(hf_config, f"sliding_window={hf_config.sliding_window} (set it to null for full attention)")
    rope_type = _rope_parameters(hf_config)["rope_type"]
    if rope_type not in ("default", "llama3"):
        _refuse(hf_config, f"rope_type={rope_type!r} RoPE scaling (supported: default, llama3)")
    if getattr(hf_config, "pretraining_tp", 1) not in (None, 1):
        _refuse(hf_config, f"pretraining_tp={hf_config.pretraining_tp}")
    kv_heads = hf_config.num_key_value_heads or hf_config.num_attention_heads
    if hf_config.num_attention_heads % kv_heads:
        _refuse(hf_config, f"num_attention_heads={hf_config.num_attention_heads} not a multiple of num_key_value_heads={kv_heads}")
    if kv_heads % tensor_parallel_size:
        raise UnsupportedHFModelError(
            f"tensor_model_parallel_size={tensor_parallel_size} must divide num_key_value_heads={kv_heads} "
            f"of model_type={model_type!r}: each tensor-parallel rank holds whole key/value head groups"
        )
    if hf_config.intermediate_size % tensor_parallel_size:
        raise UnsupportedHFModelError(
            f"tensor_model_parallel_size={tensor_parallel_size} must divide intermediate_size={hf_config.intermediate_size}"
        )


def transformer_config_from_hf(
    hf_config,
    *,
    tensor_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: int | None = None,
    context_parallel_size: int = 1,
    sequence_parallel: bool = False,
    params_dtype: torch.dtype = torch.float32,
    activation_checkpointing: bool = False,
    **overrides,
):
    """megatron-core's `TransformerConfig` for the HF model `hf_config` and the given layout.

    `overrides` are further `TransformerConfig` fields, applied last (e.g. `hidden_dropout`).
    Dropout is 0 (the HF configs of the supported families carry none). Fusions that need
    Transformer Engine, apex or CUDA kernels are off unless overridden.

    Raises:
        UnsupportedHFModelError: the family or one of its features has no exact Megatron mapping,
            or the layout does not divide the model (heads, layers, FFN).
    """
    _check_supported(hf_config, tensor_parallel_size)
    from megatron.core.transformer.transformer_config import TransformerConfig

    num_layers = hf_config.num_hidden_layers
    stages = pipeline_model_parallel_size * (virtual_pipeline_model_parallel_size or 1)
    if num_layers % stages:
        raise UnsupportedHFModelError(
            f"num_hidden_layers={num_layers} of model_type={hf_config.model_type!r} must be divisible by "
            f"pipeline_model_parallel_size x virtual stages = {stages}"
        )
    fields: dict[str, Any] = dict(
        num_layers=num_layers,
        hidden_size=hf_config.hidden_size,
        num_attention_heads=hf_config.num_attention_heads,
        num_query_groups=hf_config.num_key_value_heads or hf_config.num_attention_heads,
        kv_channels=head_dim(hf_config),
        ffn_hidden_size=hf_config.intermediate_size,
        layernorm_epsilon=hf_config.rms_norm_eps,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=hf_config.model_type == "qwen2",
        qk_layernorm=hf_config.model_type == "qwen3",
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=getattr(hf_config, "initializer_range", 0.02),
        tensor_model_parallel_size=tensor_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        context_parallel_size=context_parallel_size,
        sequence_parallel=sequence_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        # Fused kernels come from Transformer Engine, apex or CUDA extensions; the plain paths
        # compute the same function everywhere.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        # HF computes softmax in fp32 for these families.
        attention_softmax_in_fp32=True,
        # Without a GPU the weights are created on the CPU; on GPUs, on the current device.
        use_cpu_initialization=not torch.cuda.is_available(),
    )
    if activation_checkpointing:
        fields.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    fields.update(overrides)
    return TransformerConfig(**fields)


def transformer_engine_available() -> bool:
    from megatron.core.extensions import transformer_engine

    return bool(transformer_engine.HAVE_TE)


def _layer_spec(transformer_config, use_transformer_engine: bool):
    from megatron.core.models.gpt import gpt_layer_specs

    if use_transformer_engine:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=transformer_config.qk_layernorm)
    return gpt_layer_specs.get_gpt_layer_local_spec(
        qk_layernorm=transformer_config.qk_layernorm, normalization=transformer_config.normalization
    )


def build_gpt_model(hf_config, transformer_config, *, pre_process: bool, post_process: bool, vp_stage: int | None = None):
    """One chunk of the model (a pipeline stage, or one virtual stage of it), weights initialised
    by megatron-core (random) and not yet loaded: see `hf_conversion.load_hf_weights_into`.

    Transformer Engine's layer spec when TE is installed, megatron-core's local (plain PyTorch)
    spec otherwise. The model parallel state must be initialised (`parallel_state.initialize_model_parallel`).
    """
    from megatron.core.models.gpt import GPTModel

    use_te = transformer_engine_available()
    if not use_te:
        from megatron.core.transformer.enums import AttnBackend

        # The local spec's attention; `auto` would look for TE or flash kernels.
        transformer_config.attention_backend = AttnBackend.local
    rope = _rope_parameters(hf_config)
    tp = transformer_config.tensor_model_parallel_size
    model = GPTModel(
        config=transformer_config,
        transformer_layer_spec=_layer_spec(transformer_config, use_te),
        vocab_size=padded_vocab_size(hf_config.vocab_size, tp),
        max_sequence_length=hf_config.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=bool(getattr(hf_config, "tie_word_embeddings", False)),
        position_embedding_type="rope",
        rotary_base=rope["rope_theta"],
        vp_stage=vp_stage,
    )
    if rope["rope_type"] == "llama3" and hasattr(model, "rotary_pos_emb"):
        _apply_llama3_rope_scaling(model.rotary_pos_emb, rope)
    return model


def _apply_llama3_rope_scaling(rotary_pos_emb, rope: dict[str, Any]) -> None:
    # GPTModel passes only the factor to RotaryEmbedding; the other three Llama-3 parameters
    # would stay at Llama 3.1's values. The model was built without scaling, so `inv_freq` holds
    # the plain frequencies: scale them with all four parameters from the config.
    rotary_pos_emb.inv_freq = rotary_pos_emb._apply_scaling(
        rotary_pos_emb.inv_freq,
        factor=rope["factor"],
        low_freq_factor=rope["low_freq_factor"],
        high_freq_factor=rope["high_freq_factor"],
        original_max_position_embeddings=rope["original_max_position_embeddings"],
    )
