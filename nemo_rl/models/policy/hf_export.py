"""Write a complete Hugging Face model directory, by all ranks at once from their shards
(`save_hf_checkpoint_sharded`): nothing is gathered on one rank.

The result loads with `AutoModelForCausalLM.from_pretrained(path)` and no conversion:
config.json, model.safetensors (or shards plus model.safetensors.index.json past
`max_shard_size`), generation_config.json, and the modelling code of a remote-code model.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM, GenerationConfig, PretrainedConfig
from transformers.dynamic_module_utils import custom_object_save
from transformers.utils import SAFE_WEIGHTS_NAME
from transformers.utils.hub import convert_file_size_to_int

from nemo_rl.models.sharded_loading import local_slice, shared_parameter_aliases  # noqa: F401 (re-exported)


# ---------------------------------------------------------------- written by all ranks at once

INDEX_FILE = "model.safetensors.index.json"
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
_HEADER_ALIGNMENT = 8  # safetensors pads its JSON header so that the data starts aligned


@dataclass(frozen=True)
class _Entry:
    """One tensor's place in the export: its file and its byte offset in that file."""

    key: str
    shape: tuple[int, ...]
    file: str
    start: int  # from the beginning of the file


def save_hf_checkpoint_sharded(
    state_dict: dict[str, torch.Tensor],
    path: str,
    *,
    dtype: torch.dtype,
    config: PretrainedConfig,
    generation_config: GenerationConfig | None = None,
    trust_remote_code: bool = False,
    tied_keys: dict[str, str] | None = None,
    max_shard_size: str | int = "5GB",
    group: dist.ProcessGroup | None = None,
    transform_slice: Callable[[str, torch.Tensor, tuple[int, ...]], torch.Tensor] | None = None,
) -> None:
    """Writes an HF model directory at `path` from every rank's shards, with no rank holding
    more than its own shards (plus one converted copy of a shard at a time).

    `state_dict` is this rank's view (DTensors, or plain tensors every rank has alike), HF key
    names, in the same order on every rank. The file layout (which tensor in which safetensors
    file at which byte) follows from the keys, shapes and `dtype` alone, so every rank knows it:
    rank 0 writes the headers and sizes the files, then each rank writes the bytes of its own
    slices (a replicated slice by one rank only), then rank 0 writes the index and configs.
    Written into `<path>.incomplete` and renamed at the end, so `path` is complete or absent.
    `transform_slice(key, local slice, its global offset)`, if given, returns what to write in
    the slice's place (same shape; e.g. a LoRA adapter merged in, nemo_rl/models/lora_merge.py).
    All ranks call it.
    """
    if dtype not in _SAFETENSORS_DTYPES:
        raise ValueError(f"checkpointing.hf_dtype: {dtype} is not one of {sorted(map(str, _SAFETENSORS_DTYPES))}")
    rank = dist.get_rank(group)
    staging = f"{path.rstrip(os.sep)}.incomplete"
    aliases = set(tied_keys or {})
    tensors = {k: v for k, v in state_dict.items() if k not in aliases}
    entries, headers = _layout({k: tuple(v.shape) for k, v in tensors.items()}, dtype, max_shard_size)
    if rank == 0:
        if os.path.exists(staging):
            shutil.rmtree(staging)
        os.makedirs(staging)
        for name, (header, size) in headers.items():
            with open(os.path.join(staging, name), "wb") as f:
                f.write(header)
                f.truncate(size)
    dist.barrier(group)
    handles: dict[str, int] = {}
    try:
        for entry in entries:
            tensor = tensors[entry.key]
            if not _writes(tensor, rank):
                continue
            offset, shape = local_slice(tensor)
            if math.prod(shape) == 0:
                continue
            local = (tensor.to_local() if isinstance(tensor, DTensor) else tensor).detach()
            if transform_slice is not None:
                local = transform_slice(entry.key, local, offset)
            if entry.file not in handles:
                handles[entry.file] = os.open(os.path.join(staging, entry.file), os.O_WRONLY)
            _write_slice(handles[entry.file], entry, offset, local.to("cpu", dtype).contiguous())
        for fd in handles.values():
            os.fsync(fd)
    finally:
        for fd in handles.values():
            os.close(fd)
    dist.barrier(group)
    if rank == 0:
        if len(headers) > 1:
            index = {
                "metadata": {"total_size": sum(math.prod(e.shape) for e in entries) * dtype.itemsize},
                "weight_map": {e.key: e.file for e in entries},
            }
            with open(os.path.join(staging, INDEX_FILE), "w") as f:
                json.dump(index, f, indent=2, sort_keys=True)
        save_model_files(staging, config=config, dtype=dtype, generation_config=generation_config, trust_remote_code=trust_remote_code)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.rename(staging, path)
    dist.barrier(group)


def _layout(
    shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, max_shard_size: str | int
) -> tuple[list[_Entry], dict[str, tuple[bytes, int]]]:
    """Entries in file order and {file name: (header bytes, file size)}. Tensors are split into
    files of at most `max_shard_size` bytes (a larger tensor gets a file of its own), like
    transformers' `save_pretrained`, named as it names them."""
    limit = convert_file_size_to_int(max_shard_size)
    groups: list[list[str]] = [[]]
    size = 0
    for key in sorted(shapes):
        nbytes = math.prod(shapes[key]) * dtype.itemsize
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes
    names = (
        [SAFE_WEIGHTS_NAME]
        if len(groups) == 1
        else [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    )
    entries, headers = [], {}
    for name, keys in zip(names, groups):
        header_dict: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        position = 0
        for key in keys:
            nbytes = math.prod(shapes[key]) * dtype.itemsize
            header_dict[key] = {
                "dtype": _SAFETENSORS_DTYPES[dtype],
                "shape": list(shapes[key]),
                "data_offsets": [position, position + nbytes],
            }
            position += nbytes
        header = json.dumps(header_dict, separators=(",", ":")).encode()
        header += b" " * (-len(header) % _HEADER_ALIGNMENT)
        prefix = struct.pack("<Q", len(header)) + header
        data_start = len(prefix)
        for key in keys:
            start = data_start + header_dict[key]["data_offsets"][0]
            entries.append(_Entry(key=key, shape=shapes[key], file=name, start=start))
        headers[name] = (prefix, data_start + position)
    return entries, headers


def _writes(tensor: torch.Tensor, rank: int) -> bool:
    """Whether this rank writes its slice: one rank of each group holding the same slice (the
    first along every mesh dimension the tensor is replicated over; rank 0 for plain tensors)."""
    if not isinstance(tensor, DTensor):
        return rank == 0
    coordinate = tensor.device_mesh.get_coordinate()
    return all(c == 0 for c, p in zip(coordinate, tensor.placements) if p.is_replicate())


def _write_slice(fd: int, entry: _Entry, offset: tuple[int, ...], local: torch.Tensor) -> None:
    """Writes `local` (the slice at `offset` of the tensor `entry`) in place in the row-major
    bytes of the whole tensor: one write per contiguous run (one in all for a row split)."""
    shape = entry.shape
    if not shape:
        os.pwrite(fd, local.reshape(1).view(torch.uint8).numpy().tobytes(), entry.start)
        return
    partial = [d for d in range(len(shape)) if local.shape[d] != shape[d]]
    split_dim = partial[-1] if partial else 0  # dims after it are whole: contiguous runs
    run_elements = math.prod(local.shape[split_dim:])
    strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))]
    runs = local.reshape(-1, run_elements).view(torch.uint8).numpy()
    itemsize = local.element_size()
    for row, outer in enumerate(itertools.product(*(range(n) for n in local.shape[:split_dim]))):
        element = sum((offset[d] + i) * strides[d] for d, i in enumerate(outer)) + offset[split_dim] * strides[split_dim]
        os.pwrite(fd, runs[row], entry.start + element * itemsize)


def save_model_files(
    path: str, *, config: PretrainedConfig, dtype: torch.dtype, generation_config: GenerationConfig | None, trust_remote_code: bool
) -> None:
    """config.json (its dtype set to the exported one), generation_config.json and a
    remote-code model's modelling files, as `save_pretrained` writes them."""
    config = copy.deepcopy(config)
    config.dtype = dtype
    config.save_pretrained(path)
    if generation_config is not None:
        generation_config.save_pretrained(path)
    if trust_remote_code and getattr(config, "auto_map", None):
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=True)
        custom_object_save(skeleton, path, config=config)
