"""Parallelism applied to a Hugging Face causal LM by plain functions, called in this order:

    mesh = build_device_mesh(...)              # (dp_replicate, dp_shard, cp, tp), once per worker
    apply_tensor_parallel(model, mesh.tp, tensor_parallel_plan(model, ...))   # tp > 1
    apply_activation_checkpointing(model)      # optional
    apply_compile(model)                       # optional
    apply_fsdp(model, mesh.fsdp, param_dtype=..., reduce_dtype=..., cpu_offload=...)   # if fsdp_is_needed(...)

Nothing here subclasses the model; each function changes it in place and returns it.
"""

from __future__ import annotations

import fnmatch
import importlib
from collections.abc import Callable
from typing import Any
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from transformers import AutoConfig

from nemo_rl.config import ConfigError
from nemo_rl.config.schema import PolicyConfig
from nemo_rl.models.lora import LoRALinear
from nemo_rl.models.tensor_parallel_styles import PerHeadReplicated

PRECISIONS: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def hf_export_dtype(hf_dtype: str | None, device: torch.device, precision: str) -> torch.dtype:
    """The dtype of an `hf/` export: `checkpointing.hf_dtype`, or by default the training
    precision's compute dtype (float32 on CPU, which has no fast low precision)."""
    return PRECISIONS[hf_dtype or ("float32" if device.type == "cpu" else precision)]


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks, found by the class names HF lists in `_no_split_modules`."""
    block_names = set(getattr(model, "_no_split_modules", None) or ())
    # By the classes' own names: FSDP2 swaps a sharded module's class for a subclass
    # ("FSDPLlamaDecoderLayer"), so after sharding the name is found one step up the MRO.
    layers = [m for m in model.modules() if any(c.__name__ in block_names for c in type(m).__mro__)]
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

    Only `forward` is compiled, so the module hooks FSDP adds run eagerly around it,
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


def fsdp_is_needed(world_size: int, *, param_dtype: torch.dtype, cpu_offload: bool) -> bool:
    """Whether FSDP2 has work to do: shard over several ranks, cast the fp32 parameters to a
    lower compute dtype, or offload them. A single rank in fp32 needs none of it, and FSDP would
    still copy every parameter and gradient in and out around collectives of one rank (~170
    copies a step on the benchmark's 4-layer model, docs/performance.md); such a worker trains
    the plain module instead, with the same losses and interchangeable checkpoints."""
    return world_size > 1 or param_dtype != torch.float32 or cpu_offload


# ---------------------------------------------------------------- device mesh and tensor parallelism

MESH_DIMS = ("dp_replicate", "dp_shard", "cp", "tp")


@dataclass(frozen=True)
class ParallelMesh:
    """The one mesh of a run, (dp_replicate, dp_shard, cp, tp), and the views the worker uses:
    `dp` (replicate x shard: the ranks that see different rows), `fsdp` (what FSDP shards over,
    2-D for HSDP: replicate x shard) and `tp`."""

    root: DeviceMesh
    dp: DeviceMesh
    fsdp: DeviceMesh
    tp: DeviceMesh


def build_device_mesh(
    device_type: str, world_size: int, *, tensor_parallel_size: int, context_parallel_size: int, dp_replicate_size: int
) -> ParallelMesh:
    """Data parallelism (dp_shard) fills what tensor, context and replicate parallelism leave.

    Rank r sits at ((replicate * dp_shard + shard) * cp + cp_rank) * tp + tp_rank, so the ranks of
    one tensor-parallel group are consecutive (one node's fast links on GPUs); `Policy` sends
    each data-parallel shard of a batch to such a consecutive group.
    """
    model_parallel = tensor_parallel_size * context_parallel_size * dp_replicate_size
    if world_size % model_parallel:
        raise ValueError(
            f"world size {world_size} is not a multiple of tensor_parallel_size={tensor_parallel_size} x "
            f"context_parallel_size={context_parallel_size} x dp_replicate_size={dp_replicate_size}"
        )
    shape = (dp_replicate_size, world_size // model_parallel, context_parallel_size, tensor_parallel_size)
    root = init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)
    dp = root["dp_replicate", "dp_shard"]._flatten("dp")
    shard_cp = root["dp_shard", "cp"]._flatten("dp_shard_cp")
    fsdp = root["dp_replicate", "dp_shard"] if dp_replicate_size > 1 else shard_cp
    if dp_replicate_size > 1 and context_parallel_size > 1:
        raise ValueError("HSDP (dp_replicate_size > 1) with context parallelism is not available")
    return ParallelMesh(root=root, dp=dp, fsdp=fsdp, tp=root["tp"])


def tensor_parallel_problem(model_config, tensor_parallel_size: int) -> str | None:
    """Why the model (a transformers config) cannot be split over `tensor_parallel_size` ranks,
    naming the number that fails, or None. Each rank takes whole attention heads, whole KV
    heads and an equal slice of the vocabulary (embedding rows and output-layer logits)."""
    if tensor_parallel_size == 1:
        return None
    text = model_config.get_text_config()
    sizes = {
        "num_attention_heads": getattr(text, "num_attention_heads", None),
        "num_key_value_heads": getattr(text, "num_key_value_heads", None) or getattr(text, "num_attention_heads", None),
        "vocab_size": getattr(text, "vocab_size", None),
    }
    for name, size in sizes.items():
        if size is not None and size % tensor_parallel_size:
            return (
                f"policy.dtensor_cfg.tensor_parallel_size={tensor_parallel_size} does not divide the "
                f"model's {name}={size}"
            )
    return None


def check_parallel_layout(policy_cfg: PolicyConfig) -> None:
    """Refuses, before any worker starts, a tensor-parallel size the model's heads, KV heads or
    vocabulary do not divide (reads the model's config only, not its weights)."""
    tensor_parallel_size = policy_cfg.dtensor_cfg.tensor_parallel_size
    if tensor_parallel_size == 1:
        return
    model_config = AutoConfig.from_pretrained(policy_cfg.model_name, trust_remote_code=policy_cfg.trust_remote_code)
    problem = tensor_parallel_problem(model_config, tensor_parallel_size)
    if problem:
        raise ConfigError(f"{problem} (policy.model_name={policy_cfg.model_name})")


# Transformers' plan vocabulary (`config.base_model_tp_plan`) -> its DTensor style, given the
# keyword arguments that make a row-parallel output sequence-sharded (empty without SP).
#
# "colwise_gather_output" / "rowwise_split_input" are Phi-3's fused projections (`qkv_proj`,
# `gate_up_proj`) and the projections after them: the fused weight's rows are split as a plain
# column-parallel weight's are, and its output is gathered back whole, in the checkpoint's
# [q | k | v] (or [gate | up]) order, so the model's own slicing at global offsets stays right
# and no stored weight is reordered. The next row-parallel projection takes that whole input and
# uses its own slice. The cost (docs/parallelism.md): the attention and the MLP activation run
# whole on every rank, and the fused outputs are all-gathered.
_DECLARED_STYLES: dict[str, Callable[[dict[str, Any]], ParallelStyle]] = {
    "colwise": lambda rowwise_output: ColwiseParallel(),
    "rowwise": lambda rowwise_output: RowwiseParallel(**rowwise_output),
    "colwise_gather_output": lambda rowwise_output: ColwiseParallel(output_layouts=Replicate()),
    "rowwise_split_input": lambda rowwise_output: RowwiseParallel(input_layouts=Replicate(), **rowwise_output),
    "replicated_with_grad_allreduce": lambda rowwise_output: PerHeadReplicated(),
}


def _declared_style(kind: str, *, sequence_parallel: bool) -> ParallelStyle:
    """The DTensor style for one entry of transformers' plan (`_DECLARED_STYLES`)."""
    # Under sequence parallelism the row-parallel outputs are reduce-scattered along the sequence.
    rowwise_output = dict(output_layouts=Shard(1), use_local_output=False) if sequence_parallel else {}
    return _DECLARED_STYLES[kind](rowwise_output)


def tensor_parallel_plan(model: nn.Module, *, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """Module-name patterns -> DTensor parallel styles for a decoder-only HF model.

    The attention and MLP projections come from the plan the transformers config declares
    (`base_model_tp_plan`: Llama, Qwen2/3, Mistral, Gemma 2/3 declare colwise q/k/v/gate/up and
    rowwise o/down; Qwen3 and Gemma 3 add per-head q/k norms, `PerHeadReplicated`; Phi-3 declares
    its fused projections with gathered outputs, `_declared_style`); other entries are refused,
    naming them.
    Then the embedding is row-parallel (its vocabulary rows split), the output layer
    column-parallel with its logits left vocabulary-sharded (a DTensor, never gathered whole:
    the loss runs under `loss_parallel`), and with `sequence_parallel` the norms and residual
    stream are sharded along the sequence between the tensor-parallel regions.
    """
    declared = getattr(model.config.get_text_config(), "base_model_tp_plan", None) or {}
    if not declared:
        raise ValueError(
            f"{type(model).__name__} declares no tensor-parallel plan (config.base_model_tp_plan); "
            "give one with policy.dtensor_cfg.custom_parallel_plan"
        )
    unsupported = {k: v for k, v in declared.items() if v not in _DECLARED_STYLES}
    if unsupported:
        raise ValueError(
            f"{type(model).__name__}: tensor-parallel plan entries {unsupported} have no DTensor style "
            f"here (known: {list(_DECLARED_STYLES)}); give a plan with "
            "policy.dtensor_cfg.custom_parallel_plan or use tensor_parallel_size=1"
        )
    base = model.base_model_prefix  # "model"
    plan = {
        f"{base}.{pattern}": _declared_style(kind, sequence_parallel=sequence_parallel)
        for pattern, kind in declared.items()
    }
    head = model.get_output_embeddings()
    head_name = next(name for name, module in model.named_modules() if module is head)
    embed_name = next(name for name, module in model.named_modules() if module is model.get_input_embeddings())
    if not sequence_parallel:
        plan[embed_name] = RowwiseParallel(input_layouts=Replicate())
        plan[head_name] = ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)
        return plan
    # The embedding's output stays a DTensor so that the model sees the whole sequence length
    # (masks, positions); each decoder block gathers it before attention and the MLP.
    plan[embed_name] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1), use_local_output=False)
    plan[head_name] = ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False)
    layers_prefix = f"{base}.layers.*"
    plan[f"{layers_prefix}.self_attn"] = PrepareModuleInput(
        input_kwarg_layouts={"hidden_states": Shard(1)},
        desired_input_kwarg_layouts={"hidden_states": Replicate()},
    )
    plan[f"{layers_prefix}.mlp"] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
    layer = decoder_layers(model)[0]
    for name, child in layer.named_children():
        if _is_norm(child):
            plan[f"{layers_prefix}.{name}"] = SequenceParallel()
    final_norm = getattr(getattr(model, base), "norm", None)
    if final_norm is not None:
        plan[f"{base}.norm"] = SequenceParallel()
    return plan


def _is_norm(module: nn.Module) -> bool:
    name = type(module).__name__
    return name.endswith(("RMSNorm", "LayerNorm")) or isinstance(module, nn.LayerNorm)


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, plan: dict[str, ParallelStyle]) -> nn.Module:
    """`parallelize_module` with `plan`, keeping tied input/output embeddings one parameter.

    Both get the same placement (vocabulary rows split: Shard(0)), so the output layer
    simply points at the embedding's DTensor again after each was distributed separately.
    """
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and head.weight is embed.weight
    frozen = {name for name, param in model.named_parameters() if not param.requires_grad}
    plan = dict(plan)
    for pattern, style in list(plan.items()):
        targets = [m for name, m in model.named_modules() if _matches(pattern, name)]
        if targets and all(isinstance(m, LoRALinear) for m in targets):
            for lora_linear in targets:
                _parallelize_lora_linear(lora_linear, tp_mesh, style)
            del plan[pattern]
    parallelize_module(model, tp_mesh, plan)
    if tied:
        head.weight = embed.weight
    # torch's SequenceParallel registers the norms' weights anew as parameters that require
    # grad, whatever they were: under LoRA the frozen norms would otherwise train.
    for name, param in model.named_parameters():
        if name in frozen:
            param.requires_grad_(False)
    return model


def _matches(pattern: str, name: str) -> bool:
    """`parallelize_module`'s matching: dot-separated atoms, each an fnmatch pattern."""
    atoms, parts = pattern.split("."), name.split(".")
    return len(atoms) == len(parts) and all(fnmatch.fnmatch(part, atom) for atom, part in zip(atoms, parts))


def _parallelize_lora_linear(module: LoRALinear, tp_mesh: DeviceMesh, style: ParallelStyle) -> None:
    """A column- or row-parallel `LoRALinear`: the frozen weight sharded as the plain linear's
    would be, and the adapter so that its update lands on the same shards.

    Column-parallel: A whole (replicated), B split along its outputs, like the weight. Row-
    parallel: A split along its inputs, like the weight; its partial sums are reduced before the
    (replicated) B. The outputs are those of the plain style (local shards, or the
    sequence-sharded DTensor under sequence parallelism).
    """
    if isinstance(style, ColwiseParallel):
        weight_placement, a_placement, b_placement = Shard(0), Replicate(), Shard(0)
        bias_placement, input_placement = Shard(0), Replicate()
    elif isinstance(style, RowwiseParallel):
        weight_placement, a_placement, b_placement = Shard(1), Shard(1), Replicate()
        bias_placement, input_placement = Replicate(), Shard(-1)
    else:
        raise ValueError(f"LoRA under tensor parallelism: no rule for a {type(style).__name__} adapter target")
    placements = {"weight": weight_placement, "bias": bias_placement}

    def distribute(name: str, submodule: nn.Module, mesh: DeviceMesh) -> None:
        for param_name, param in list(submodule.named_parameters(recurse=False)):
            if submodule is module:
                placement = placements[param_name]
            else:
                placement = a_placement if submodule is module.lora_A else b_placement
            sharded = nn.Parameter(distribute_tensor(param, mesh, [placement]), requires_grad=param.requires_grad)
            submodule.register_parameter(param_name, sharded)

    wanted_output = style.output_layouts[0] if isinstance(style.output_layouts, tuple) else style.output_layouts
    use_local_output = style.use_local_output

    # What a plain tensor input holds: the style's input layout (e.g. whole before Phi-3's
    # row-parallel o_proj, "rowwise_split_input"), then taken to the layout the weight needs.
    given_input = style.input_layouts[0]

    def prepare_input(mod: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
        x = inputs[0]
        if not isinstance(x, DTensor):
            x = DTensor.from_local(x, mesh, [given_input], run_check=False)
        if x.placements != (input_placement,):
            x = x.redistribute(placements=[input_placement])
        return (x, *inputs[1:])

    def prepare_output(mod: nn.Module, output: DTensor, mesh: DeviceMesh) -> torch.Tensor:
        if output.placements != (wanted_output,):
            output = output.redistribute(placements=[wanted_output])
        return output.to_local() if use_local_output else output

    distribute_module(module, tp_mesh, distribute, input_fn=prepare_input, output_fn=prepare_output)
    if isinstance(style, RowwiseParallel):
        # A's partial sums (its input is split) are reduced before B, whose weight is whole.
        module.lora_A.register_forward_hook(lambda mod, inputs, out: out.redistribute(placements=[Replicate()]))


def import_parallel_plan(dotted_path: str) -> Any:
    """The object `custom_parallel_plan` names; ValueError naming the key when it cannot be imported."""
    module_name, _, attribute = dotted_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ValueError(f"policy.dtensor_cfg.custom_parallel_plan={dotted_path!r}: cannot import it ({exc})") from exc


def load_parallel_plan(dotted_path: str, model: nn.Module, *, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """`custom_parallel_plan`: "package.module.NAME", a dict of patterns -> styles or a function
    (model, sequence_parallel) -> such a dict (NeMo RL's form)."""
    value = import_parallel_plan(dotted_path)
    plan = value(model, sequence_parallel=sequence_parallel) if callable(value) else value
    if not isinstance(plan, dict) or not all(isinstance(s, ParallelStyle) for s in plan.values()):
        raise ValueError(
            f"policy.dtensor_cfg.custom_parallel_plan={dotted_path!r}: expected a dict of module-name "
            "patterns to torch.distributed.tensor.parallel styles (or a function returning one)"
        )
    return plan
