"""LoRA merged into the base model slice by slice, for the `hf_merged/` export written by all
ranks from their shards (`save_hf_checkpoint_sharded(..., transform_slice=...)`).

Each rank holds a slice W[r0:r1, c0:c1] of an adapted weight (FSDP splits rows; a column-
parallel TP weight splits rows, a row-parallel one columns; both together split both). Element
(i, j) of B @ A is the dot product of row i of B and column j of A, so the slice of the merged
weight is

    W[r0:r1, c0:c1] + scale * B[r0:r1, :] @ A[:, c0:c1],   scale = alpha / dim

whatever the placement: no rank needs the whole of W. The adapter itself is small (dim rows or
columns) and is passed in whole; the worker gathers it anyway for the PEFT `hf/` directory.

Shape legend: O out_features, I in_features, R rank (`dim`); lowercase o, i: this rank's slice.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from nemo_rl.config.schema import LoRAConfig
from nemo_rl.models.lora import LORA_SUFFIXES

_A_SUFFIX, _B_SUFFIX = LORA_SUFFIXES

# (HF key, this rank's slice of the tensor, the slice's global offset) -> the slice to write
SliceTransform = Callable[[str, torch.Tensor, tuple[int, ...]], torch.Tensor]


def lora_merge_slices(adapter_state_dict: dict[str, torch.Tensor], cfg: LoRAConfig, base_keys: set[str]) -> SliceTransform:
    """A slice transform that merges each adapter into its base weight's slice (in fp32; the
    writer then converts to the export dtype) and leaves every other tensor as it is.

    `adapter_state_dict` holds the whole lora_A [R, I] / lora_B [O, R] tensors under the model's
    own names (`<module>.lora_A.weight`); `base_keys` are the keys the export writes, which must
    include each adapted `<module>.weight`.
    """
    scale = cfg.alpha / cfg.dim
    adapters: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, A_RI in adapter_state_dict.items():
        if not key.endswith(_A_SUFFIX):
            continue
        module = key[: -len(_A_SUFFIX)]
        weight_key = f"{module}.weight"
        if weight_key not in base_keys:
            raise KeyError(f"LoRA merge: {weight_key} (the base of {key}) is not in the exported state dict")
        adapters[weight_key] = (A_RI, adapter_state_dict[module + _B_SUFFIX])

    def merge(key: str, W_oi: torch.Tensor, offset: tuple[int, ...]) -> torch.Tensor:
        if key not in adapters:
            return W_oi
        A_RI, B_OR = adapters[key]
        rows = slice(offset[0], offset[0] + W_oi.shape[0])
        cols = slice(offset[1], offset[1] + W_oi.shape[1])
        B_oR = B_OR[rows].to(W_oi.device, torch.float32)
        A_Ri = A_RI[:, cols].to(W_oi.device, torch.float32)
        return W_oi.float() + scale * (B_oR @ A_Ri)

    return merge
