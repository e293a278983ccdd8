"""Tiny random Hugging Face models of each family the Megatron backend supports, and a rank
scenario that builds the Megatron model for a layout, loads the HF weights and runs a forward."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

_COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)

# name -> HF config. Between them: GQA, tied and untied embeddings, Llama-3 RoPE scaling with
# non-default parameters, q/k/v bias, q/k norm with head_dim != hidden/heads, and a vocabulary
# that tensor parallelism of 2 does not divide (padded to 128 rows).
TINY_CONFIGS = {
    "llama_untied_gqa": lambda: LlamaConfig(vocab_size=128, tie_word_embeddings=False, **_COMMON),
    "llama3_tied_rope_scaling": lambda: LlamaConfig(
        vocab_size=128,
        tie_word_embeddings=True,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 4.0,
            "low_freq_factor": 2.0,
            "high_freq_factor": 8.0,
            "original_max_position_embeddings": 64,
        },
        **_COMMON,
    ),
    "qwen2_qkv_bias": lambda: Qwen2Config(vocab_size=128, tie_word_embeddings=False, **_COMMON),
    "qwen3_qk_norm": lambda: Qwen3Config(vocab_size=128, head_dim=32, tie_word_embeddings=True, **_COMMON),
    "mistral_odd_vocab": lambda: MistralConfig(vocab_size=127, sliding_window=None, tie_word_embeddings=False, **_COMMON),
}

SEQ_LEN = 12


def make_tiny_hf_model(name: str, out_dir: Path, seed: int = 0):
    """A random fp32 HF model of family `name`, saved (safetensors) to `out_dir`; the model.

    Every tensor is drawn at random (norm weights and biases too: HF initialises them to ones and
    zeros, which would hide a norm or a bias loaded into the wrong place)."""
    torch.manual_seed(seed)
    config = TINY_CONFIGS[name]()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "norm" in param_name:
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 0.1)
    model.save_pretrained(out_dir)
    return model


def sample_input_ids(vocab_size: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (2, SEQ_LEN), generator=generator)


def _forward_logits(chunk, input_ids: torch.Tensor, vocab_size: int) -> torch.Tensor | None:
    """This pipeline stage's forward (receiving from / sending to its neighbours); the full
    logits [batch, seq, vocab] on the last stage, None elsewhere."""
    from megatron.core import parallel_state

    positions = torch.arange(input_ids.shape[1]).expand_as(input_ids)
    if not parallel_state.is_pipeline_first_stage():
        hidden_SBH = torch.empty(input_ids.shape[1], input_ids.shape[0], chunk.config.hidden_size)
        torch.distributed.recv(hidden_SBH, src=parallel_state.get_pipeline_model_parallel_prev_rank())
        chunk.set_input_tensor(hidden_SBH)
    out = chunk(input_ids, positions, attention_mask=None)
    if not parallel_state.is_pipeline_last_stage():
        torch.distributed.send(out.contiguous(), dst=parallel_state.get_pipeline_model_parallel_next_rank())
        return None
    shards = [torch.empty_like(out) for _ in range(parallel_state.get_tensor_model_parallel_world_size())]
    torch.distributed.all_gather(shards, out.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(shards, dim=-1)[..., :vocab_size]


def logits_and_round_trip_scenario(rank: int, layouts: list[tuple[int, int]], hf_dirs: dict[str, str], out_root: str) -> dict:
    """For each (tp, pp) layout and each HF model: build the Megatron model, load the HF weights
    from the safetensors directory, run the forward; then write the model back as an HF
    directory under `out_root/<layout>/<name>`. Returns {(name, tp, pp): logits} from the ranks
    that hold full logits (the last stage's tensor-parallel rank 0 of each replica)."""
    from transformers import AutoConfig

    from nemo_rl.models.megatron import hf_conversion, model_builder, parallel_state
    from nemo_rl.models.megatron.cpu_support import enable_megatron_on_cpu

    torch.distributed.init_process_group("gloo")
    enable_megatron_on_cpu()
    from megatron.core import parallel_state as mcore_state

    results = {}
    for tp, pp in layouts:
        parallel_state.initialize_model_parallel(tp, pp)
        for name, hf_dir in hf_dirs.items():
            hf_config = AutoConfig.from_pretrained(hf_dir)
            config = model_builder.transformer_config_from_hf(hf_config, tensor_parallel_size=tp, pipeline_model_parallel_size=pp)
            chunk = model_builder.build_gpt_model(
                hf_config, config, pre_process=mcore_state.is_pipeline_first_stage(), post_process=mcore_state.is_pipeline_last_stage()
            ).eval()
            hf_conversion.load_hf_weights_into([chunk], hf_dir, hf_config)
            with torch.no_grad():
                logits = _forward_logits(chunk, sample_input_ids(hf_config.vocab_size), hf_config.vocab_size)
            if logits is not None and mcore_state.get_tensor_model_parallel_rank() == 0:
                results[(name, tp, pp)] = logits
            hf_conversion.save_hf_model([chunk], hf_config, os.path.join(out_root, f"tp{tp}pp{pp}", name), dtype=torch.float32)
        parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()
    return results
