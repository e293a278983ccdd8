"""Model FLOPs against a hand count on tiny models, the GPU peak table, and MFU."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

from nemo_rl.utils import flops
from nemo_rl.utils.flops import gpu_peak_flops, matmul_weights_per_token, mfu, training_flops


def _hand_count(model: nn.Module, heads: int, head_dim: int, layers: int, lengths: list[int]) -> float:
    """Every nn.Linear weight once per token (2 FLOPs each), plus causal attention counted
    query by query: position t attends to t + 1 keys, QK^T and AV 2 * head_dim each."""
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    forward = 2 * weights * sum(lengths)
    for n in lengths:
        for t in range(n):
            forward += layers * heads * (2 * head_dim * (t + 1) + 2 * head_dim * (t + 1))
    return 3 * forward


def test_llama_flops_match_a_hand_count():
    config = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    # q 32x32, k and v 32x16, o 32x32, gate/up/down 3 x 32x64: 9216 per layer; head 32x128
    assert matmul_weights_per_token(config) == 2 * 9216 + 4096
    lengths = [3, 5, 1, 17]
    assert training_flops(config, lengths) == _hand_count(model, 4, 8, 2, lengths)


def test_a_frozen_base_costs_two_forwards_and_the_adapters_six_flops_per_parameter():
    config = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    )
    lengths = [3, 5, 1, 17]
    tokens = sum(lengths)
    weights_forward = 2 * (2 * 9216 + 4096) * tokens
    attention = training_flops(config, lengths) - 3 * weights_forward  # what the weights leave
    got = training_flops(config, lengths, lora_params=1000)
    assert got == 2 * weights_forward + attention + 6 * 1000 * tokens
    assert got < training_flops(config, lengths)


def test_non_gated_mlp_flops_match_a_hand_count():
    config = GPTNeoXConfig(
        vocab_size=100, hidden_size=24, intermediate_size=40, num_hidden_layers=3, num_attention_heads=3
    )
    model = GPTNeoXForCausalLM(config)
    assert training_flops(config, [7, 2]) == _hand_count(model, 3, 8, 3, [7, 2])


def test_attention_makes_flops_grow_faster_than_tokens():
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    # one sample of 8 costs more than two of 4 (attention is quadratic), less than twice
    assert 2 * training_flops(config, [4]) < training_flops(config, [8]) < 2 * training_flops(config, [4]) * 1.5


@pytest.mark.parametrize(
    ("name", "dtype", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.4e12),
        ("NVIDIA H100 PCIe", torch.bfloat16, 756.5e12),
        ("NVIDIA H200", torch.bfloat16, 989.4e12),
        ("NVIDIA GH200 480GB", torch.bfloat16, 989.4e12),
        ("NVIDIA A100-SXM4-80GB", torch.float32, 19.5e12),
        ("NVIDIA L40S", torch.bfloat16, 362.05e12),
        ("NVIDIA L4", torch.bfloat16, 121e12),
        ("NVIDIA GeForce GTX 1080", torch.bfloat16, None),
    ],
)
def test_gpu_peak_table(name, dtype, peak):
    assert gpu_peak_flops(name, dtype) == peak


def test_mfu_and_the_peak_override(monkeypatch):
    assert mfu(5e12, 2.0, 10e12) == 0.25
    assert mfu(5e12, 2.0, None) is None
    monkeypatch.setenv(flops.PEAK_ENV_VAR, "12.5")
    assert flops.device_peak_flops(torch.device("cpu"), torch.float32) == (12.5e12, f"${flops.PEAK_ENV_VAR}")
    monkeypatch.delenv(flops.PEAK_ENV_VAR)
    measured, source = flops.device_peak_flops(torch.device("cpu"), torch.float32)
    assert measured > 1e8 and source == "measured matmul"


def test_the_output_layer_counts_only_at_target_positions_when_given():
    config = LlamaConfig(vocab_size=1000, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    everywhere = training_flops(config, [10, 6])
    assert everywhere - training_flops(config, [10, 6], num_targets=4) == 3 * 2 * 16 * 1000 * (16 - 4)
    assert training_flops(config, [10, 6], num_targets=16) == everywhere
