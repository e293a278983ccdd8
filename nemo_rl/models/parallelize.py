"""Parallelism applied to a Hugging Face causal LM by plain functions, called in this order:

    apply_activation_checkpointing(model)      # optional
    apply_compile(model)                       # optional
    apply_fsdp(model, mesh, param_dtype=..., reduce_dtype=..., cpu_offload=...)

Nothing here subclasses the model; each function changes it in place and returns it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)

PRECISIONS: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks, found by the class names HF lists in `_no_split_modules`."""
    block_names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in block_names]
    if not layers:
        raise ValueError(
            f"{type(model).__name__}: found no decoder layers to shard "
            f"(looked for _no_split_modules={sorted(block_names)})"
        )
    return layers


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute each decoder layer's activations in backward (non-reentrant checkpoint).

    Uses HF's own per-layer switch, so parameter names and the state dict keep HF's keys
    (wrapping the layers would add a prefix). Active in train mode only.
    """
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


def apply_compile(model: nn.Module, *, backend: str = "inductor") -> nn.Module:
    """torch.compile each decoder layer's forward (the layers share one compiled graph).

    Only `forward` is compiled, so the module hooks FSDP adds later run eagerly around it,
    and parameter names and the state dict are unchanged (no `_orig_mod.` wrapper).
    Shapes that vary between micro-batches (dynamic batching, packing) recompile once,
    then run with dynamic shapes.
    """
    for layer in decoder_layers(model):
        layer.forward = torch.compile(layer.forward, backend=backend)
    return model


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    param_dtype: torch.dtype,
    reduce_dtype: torch.dtype = torch.float32,
    cpu_offload: bool = False,
) -> nn.Module:
    """FSDP2: `fully_shard` each decoder layer, then the root (embeddings, final norm, head).

    The parameters stay in their loaded dtype (the fp32 master copy); `param_dtype` is what
    forward and backward compute in, gradients are reduced in `reduce_dtype`.

    Gradients are *summed* over the data-parallel ranks, not averaged: our loss is already
    divided by the global token count, so each rank's gradient is its share of the
    global-mean gradient and the sum is the whole of it.
    """
    mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    offload_policy = OffloadPolicy()
    if cpu_offload:
        # Pinned host memory needs a GPU; on a CPU mesh "offloading" changes nothing anyway.
        offload_policy = CPUOffloadPolicy(pin_memory=mesh.device_type == "cuda")
    # Innermost first: a block nested in another block must be sharded before its parent.
    for layer in reversed(decoder_layers(model)):
        fully_shard(layer, mesh=mesh, mp_policy=mp_policy, offload_policy=offload_policy)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, offload_policy=offload_policy)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            # Plain SUM collectives (no PREMUL_SUM), which every backend, gloo included, has.
            module.set_force_sum_reduction_for_comms(True)
    return model
