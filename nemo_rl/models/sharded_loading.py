"""Load a Hugging Face causal LM without any process holding the whole model.

    model = build_meta_model(model_name, config=..., ...)   # parameters on the meta device
    (LoRA, tensor parallelism, FSDP: the plain functions of models/parallelize.py)
    report = load_hf_shards(model, model_name, device=..., lora_targets=..., lora_rng_state=...)

`build_meta_model` constructs the architecture with its parameters on the meta device (no
memory, no random init) and its buffers real: buffers such as rotary `inv_freq` are computed
by the modules' constructors and are not in the checkpoint, so they are kept as built.

`load_hf_shards` then materialises each rank's shards only (`to_empty`) and fills every
parameter's local shard from the safetensors files, reading just that shard's rows and
columns (`safe_open(...).get_slice`). A parameter the checkpoint lacks is refused by name (no
random init behind the user's back); tied weights are tied again; LoRA adapters get the
exact values `apply_lora` would have drawn on a loaded model, from the same RNG state.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from safetensors import safe_open
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from transformers import AutoModelForCausalLM, PretrainedConfig

from nemo_rl.models.lora import LoRALinear
from nemo_rl.utils.hf_config import load_generation_config

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"


@dataclass
class LoadReport:
    """What this rank read: per checkpoint key, the (offset, shape) of the slice it read."""

    slices: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    bytes_read: int = 0
    checkpoint_bytes: int = 0  # all tensors of the checkpoint together


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside goes to the meta device; buffers stay where they are
    made. (torch.device("meta") would put the computed buffers there too.)"""
    register_parameter = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register_parameter(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register_parameter


def build_meta_model(
    model_name: str,
    *,
    config: PretrainedConfig,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> nn.Module:
    """The fp32 architecture of `config` with its parameters on the meta device, in eval mode
    and with `model_name`'s generation config, as `from_pretrained` would leave it."""
    kwargs: dict[str, Any] = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(
            config, trust_remote_code=trust_remote_code, dtype=torch.float32, **kwargs
        )
    model.name_or_path = model_name
    model.config.name_or_path = model_name
    model.generation_config = load_generation_config(model_name, model.config)
    return model.eval()


def safetensors_files(model_name: str) -> dict[str, str]:
    """{checkpoint key: path of the safetensors file holding it} for a local directory or a
    Hub model id (its safetensors and JSON files are downloaded to the HF cache, once)."""
    directory = model_name
    if not os.path.isdir(directory):
        from huggingface_hub import snapshot_download

        directory = snapshot_download(model_name, allow_patterns=["*.safetensors", "*.json"])
    index_path = os.path.join(directory, SAFETENSORS_INDEX_FILE)
    if os.path.isfile(index_path):
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        return {key: os.path.join(directory, name) for key, name in weight_map.items()}
    single = os.path.join(directory, SAFETENSORS_FILE)
    if not os.path.isfile(single):
        raise FileNotFoundError(
            f"policy.model_name={model_name!r}: no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX_FILE} in "
            f"{directory}; sharded loading reads safetensors only (convert .bin checkpoints first)"
        )
    with safe_open(single, framework="pt") as f:
        return {key: single for key in f.keys()}


def local_slice(tensor: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(global offset, local shape) of this rank's shard of `tensor` (the whole of a plain one)."""
    if not isinstance(tensor, DTensor):
        return (0,) * tensor.dim(), tuple(tensor.shape)
    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    return tuple(offset), tuple(shape)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


@torch.no_grad()
def load_hf_shards(
    model: nn.Module,
    model_name: str,
    *,
    device: torch.device | str,
    lora_targets: list[str] = (),
    lora_rng_state: torch.Tensor | None = None,
) -> LoadReport:
    """Materialises `model` (built by `build_meta_model`, then LoRA'd and parallelized) on
    `device` and fills this rank's shards from `model_name`'s safetensors. All ranks call it;
    it runs no collectives."""
    files = safetensors_files(model_name)
    aliases = shared_parameter_aliases(model)
    buffers = {name: buf for name, buf in model.named_buffers() if buf.device.type != "meta"}
    model.to_empty(device=device)
    for alias, source in aliases.items():  # to_empty makes a new parameter per module
        _set_parameter(model, alias, model.get_parameter(source))
    for name, buf in buffers.items():
        module_name, _, leaf = name.rpartition(".")
        model.get_submodule(module_name)._buffers[leaf] = buf.to(device)

    lora_values = _lora_initial_values(model, lora_targets, lora_rng_state) if lora_targets else {}
    report = LoadReport()
    missing = []
    # Buffers the checkpoint has (persistent ones) come from it; the others stay as built.
    checkpoint_buffers = [(name, buf) for name, buf in model.named_buffers() if name in files]
    by_file: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for name, tensor in [*model.named_parameters(), *checkpoint_buffers]:
        if name in lora_values:
            offset, shape = local_slice(tensor)
            _local(tensor).copy_(lora_values[name][tuple(slice(o, o + s) for o, s in zip(offset, shape))])
        elif name in files:
            by_file.setdefault(files[name], []).append((name, tensor))
        else:
            missing.append(name)
    if missing:
        raise ValueError(
            f"policy.model_name={model_name!r}: the checkpoint has no {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''} ({len(missing)} tensors the model needs); "
            "sharded loading does not invent weights: use a checkpoint with every parameter"
        )
    for path in sorted(set(files.values())):
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                report.checkpoint_bytes += _stored_bytes(f.get_slice(key))
            for name, tensor in by_file.get(path, []):
                offset, shape = local_slice(tensor)
                report.slices[name] = (offset, shape)
                if math.prod(shape) == 0:
                    continue
                source = f.get_slice(name)
                if tuple(source.get_shape()) != tuple(tensor.shape):
                    raise ValueError(
                        f"policy.model_name={model_name!r}: {name} has shape {tuple(source.get_shape())} in "
                        f"{path}, the model expects {tuple(tensor.shape)}"
                    )
                index = tuple(slice(o, o + s) for o, s in zip(offset, shape))
                values = source[index] if shape else source[...]
                report.bytes_read += values.numel() * values.element_size()
                _local(tensor).copy_(values)
    return report


_ITEMSIZE = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "BF16": 2, "F16": 2, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _stored_bytes(source: Any) -> int:
    """The size of one tensor in a safetensors file, from its header (nothing is read)."""
    return math.prod(source.get_shape()) * _ITEMSIZE.get(source.get_dtype(), 4)


def shared_parameter_aliases(model: nn.Module) -> dict[str, str]:
    """{alias: first name} for parameters registered under more than one name (tied weights)."""
    first_name: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first_name:
            aliases[name] = first_name[id(param)]
        else:
            first_name[id(param)] = name
    return aliases


def _set_parameter(model: nn.Module, name: str, param: nn.Parameter) -> None:
    module_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(module_name), leaf, param)


def _lora_initial_values(
    model: nn.Module, targets: list[str], rng_state: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """The whole lora_A / lora_B of each target as `LoRALinear`'s constructor draws them on a
    loaded fp32 model: per target in order, nn.Linear's own init of A then B, then A's chosen
    init and B zeroed. Replayed from `rng_state` (taken before `apply_lora`) so that a run's
    adapters do not depend on how its base weights were loaded. Adapters are small."""
    values = {}
    with torch.random.fork_rng(devices=[]):
        if rng_state is not None:
            torch.set_rng_state(rng_state)
        for name in targets:
            module = model.get_submodule(name)
            if not isinstance(module, LoRALinear):
                raise TypeError(f"{name} is not a LoRALinear; apply_lora before load_hf_shards")
            lora_A = nn.Linear(module.in_features, module.dim, bias=False)
            lora_B = nn.Linear(module.dim, module.out_features, bias=False)
            module_ = _InitOnly(lora_A, lora_B, module.lora_A_init)
            LoRALinear.reset_lora_parameters(module_)
            values[f"{name}.lora_A.weight"] = lora_A.weight.detach()
            values[f"{name}.lora_B.weight"] = lora_B.weight.detach()
    return values


@dataclass
class _InitOnly:
    """The attributes `LoRALinear.reset_lora_parameters` reads, on whole CPU tensors."""

    lora_A: nn.Linear
    lora_B: nn.Linear
    lora_A_init: str
