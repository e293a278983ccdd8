"""Model FLOPs of a dense decoder-only transformer, device peaks, and MFU.

Model FLOPs count what the training step needs, not what an implementation happens to run:
padding, activation recomputation and the loss's recomputation are not counted, so MFU
compares implementations fairly (PaLM's definition, appendix B). One refinement for SFT: the
output layer is counted at the positions whose logits the loss needs (the target tokens),
since logits elsewhere are thrown away; without a target count it is counted at every token,
the pretraining convention.

For one sample of S tokens, per decoder layer, with h query heads of size d:
  matmuls      2 FLOPs per weight per token (q, k, v, o projections, the MLP's matrices),
               plus the output layer (H x V) at each target position;
  attention    causal: the query at position t attends to t + 1 keys, QK^T and AV each
               2 * h * d * (t + 1) FLOPs, so 2 * h * d * S * (S + 1) for the sample;
  training     3x the forward (backward computes gradients for inputs and weights).
Embedding lookups, norms, rotary embeddings and the softmax are left out (all O(H) per token).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable
from typing import Any

import torch

# Models whose MLP has two matrices (up, down) rather than three (gate, up, down).
NON_GATED_MLP = frozenset({"gpt2", "gpt_neox", "gptj", "opt", "bloom", "falcon", "phi", "starcoder2", "gpt_bigcode"})

# Dense (no sparsity) peak FLOP/s from NVIDIA's datasheets: bf16/fp16 tensor cores, and fp32
# without TF32 (PyTorch's default for float32 matmuls). First matching pattern wins.
GPU_PEAK_FLOPS: list[tuple[str, dict[str, float]]] = [
    (r"GH200", {"bf16": 989.4e12, "fp32": 66.9e12}),
    (r"H200 NVL", {"bf16": 835.5e12, "fp32": 60.0e12}),
    (r"H200", {"bf16": 989.4e12, "fp32": 66.9e12}),
    (r"H100 NVL", {"bf16": 835.5e12, "fp32": 60.0e12}),
    (r"H100 PCIe", {"bf16": 756.5e12, "fp32": 51.2e12}),
    (r"H100", {"bf16": 989.4e12, "fp32": 66.9e12}),  # SXM: "NVIDIA H100 80GB HBM3"
    (r"H800", {"bf16": 989.4e12, "fp32": 66.9e12}),
    (r"B200", {"bf16": 2250e12}),
    (r"A100", {"bf16": 312e12, "fp32": 19.5e12}),
    (r"A800", {"bf16": 312e12, "fp32": 19.5e12}),
    (r"L40S", {"bf16": 362.05e12, "fp32": 91.6e12}),
    (r"\bL4\b", {"bf16": 121e12, "fp32": 30.3e12}),
    (r"\bA10\b", {"bf16": 125e12, "fp32": 31.2e12}),
    (r"RTX 6000 Ada", {"bf16": 364.2e12, "fp32": 91.1e12}),
    (r"RTX A6000", {"bf16": 154.8e12, "fp32": 38.7e12}),
]

PEAK_ENV_VAR = "NEMO_RL_PEAK_TFLOPS"  # overrides the table and the CPU measurement


def _text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def matmul_weights_per_token(config: Any, *, output_layer: bool = True) -> int:
    """Weights a token multiplies by: decoder layers' projections and MLP, and (if
    `output_layer`) the output layer (counted even when tied to the embedding, a lookup)."""
    c = _text_config(config)
    hidden, heads = c.hidden_size, c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or hidden // heads
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    intermediate = getattr(c, "intermediate_size", None) or 4 * hidden
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)  # q and o; k and v
    mlp = (2 if c.model_type in NON_GATED_MLP else 3) * hidden * intermediate
    return c.num_hidden_layers * (attention + mlp) + (hidden * c.vocab_size if output_layer else 0)


def training_flops(
    config: Any, lengths: Iterable[int], *, num_targets: int | None = None, lora_params: int | None = None
) -> float:
    """Model FLOPs of one forward and backward over samples of these token counts, each
    attending only to itself (padded, packed or not: the same number), with the output layer
    at `num_targets` positions (None: at every token).

    `lora_params`: the adapters' parameter count when the base is frozen (LoRA). The base's
    matrices then cost 2x their forward (the backward computes input gradients only, no
    weight gradients), and the adapters 6 FLOPs per parameter per token like trained weights.
    """
    c = _text_config(config)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    lengths = [int(n) for n in lengths]
    tokens = sum(lengths)
    output_positions = tokens if num_targets is None else int(num_targets)
    attention_pairs = sum(n * (n + 1) for n in lengths)  # 2 x the causal (query, key) pairs
    weights_forward = 2 * matmul_weights_per_token(c, output_layer=False) * tokens
    weights_forward += 2 * c.hidden_size * c.vocab_size * output_positions
    attention_forward = c.num_hidden_layers * 2 * c.num_attention_heads * head_dim * attention_pairs
    if lora_params is None:
        return 3.0 * (weights_forward + attention_forward)
    return 2.0 * weights_forward + 3.0 * attention_forward + 6.0 * lora_params * tokens


def mfu(model_flops: float, seconds: float, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak of all devices used."""
    if not peak_flops or seconds <= 0:
        return None
    return model_flops / seconds / peak_flops


def gpu_peak_flops(device_name: str, dtype: torch.dtype) -> float | None:
    key = "fp32" if dtype == torch.float32 else "bf16"
    for pattern, peaks in GPU_PEAK_FLOPS:
        if re.search(pattern, device_name):
            return peaks.get(key)
    return None


def measure_matmul_flops(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, *, n: int = 1024, repeats: int = 3) -> float:
    """Best-of-`repeats` FLOP/s of an n x n matmul with this process's thread settings: the
    practical peak of a CPU, for which no datasheet number applies."""
    generator = torch.Generator(device).manual_seed(0)  # leaves the global random stream alone
    a = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    torch.matmul(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        torch.matmul(a, b)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def device_peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float | None, str]:
    """(peak FLOP/s of one device for `dtype`, where the number came from).

    `NEMO_RL_PEAK_TFLOPS` wins; then the GPU table; an unknown GPU gives None (no MFU
    logged); a CPU's peak is measured with a short matmul.
    """
    override = os.environ.get(PEAK_ENV_VAR)
    if override:
        return float(override) * 1e12, f"${PEAK_ENV_VAR}"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return gpu_peak_flops(name, dtype), f"table: {name}"
    return measure_matmul_flops(device, dtype), "measured matmul"
