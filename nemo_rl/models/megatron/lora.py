"""LoRA on megatron-core's parallel linears (`policy.megatron_cfg.peft`), exported as a PEFT adapter.

Which linears: `linear_qkv`, `linear_proj`, `linear_fc1`, `linear_fc2` of every decoder layer
(NeMo RL's names), chosen by `target_modules` / `exclude_modules` patterns over the global module
names (`decoder.layers.3.self_attention.linear_qkv`); see `select_targets`. The HF names
`q_proj`, `k_proj`, `v_proj` (all three together), `o_proj`, `gate_proj` + `up_proj`,
`down_proj` are accepted for the Megatron module holding them.

One adapter per Megatron linear, as in Megatron-Bridge: the fused `linear_qkv` and `linear_fc1`
get ONE `lora_A` shared by q/k/v (gate/up), and a `lora_B` covering all their output rows.
Its export is exact: PEFT's q_proj, k_proj and v_proj each get that `lora_A` and their rows of
`lora_B` (Megatron's per-KV-group [q; k; v] interleave and the per-rank [gate; up] packing undone
with hf_conversion's mapping), which is the same function of the input.

    y = base(x) + scale * B(A(x)),   scale = alpha / dim     (dropout "pre": on x; "post": on B's output)

Tensor parallelism, with the reductions that make every rank's gradients the full ones:
  column-parallel base (linear_qkv, linear_fc1; input x replicated, output rows sharded):
      A [R, I] replicated; h = A x, then `copy_to_tensor_model_parallel_region` (identity forward,
      all-reduce of dL/dh backward: each rank's B shard contributes to it); B [O/tp, R] sharded
      by rows like the base weight.
  row-parallel base (linear_proj, linear_fc2; input x sharded by columns, output all-reduced):
      A [R, I/tp] sharded by columns like the base weight; h = all-reduce(A_local x_local)
      (`reduce_from_tensor_model_parallel_region`); B [O, R] replicated.

The adapter is a sibling module of the linear it adapts (`linear_qkv_lora` next to
`linear_qkv`, holding `lora_A` and `lora_B`) and runs from a forward hook on the linear: the
base module, its parameter names and its checkpoint keys stay megatron-core's own, and the
adapter writes its own correctly sharded dist_checkpointing entries.

Every rank draws the full `lora_A` from a generator seeded by (seed, layer, module), and keeps
its slice: the initial adapter does not depend on the parallel layout.

Shape legend: S sequence, B batch, I in_features, O out_features, R rank (`dim`).
"""

from __future__ import annotations

import logging
import os
import re
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from nemo_rl.config.megatron_schema import MegatronPeftConfig
from nemo_rl.config.schema import LoRAConfig
from nemo_rl.models.lora import adapter_target_modules, init_lora_A_, pattern_matches, save_peft_adapter
from nemo_rl.models.megatron import hf_conversion

CONFIG_KEY = "policy.megatron_cfg.peft"
# Megatron linear -> its path inside a decoder layer; the first two are column-parallel.
LINEAR_PATHS = {
    "linear_qkv": "self_attention.linear_qkv",
    "linear_fc1": "mlp.linear_fc1",
    "linear_proj": "self_attention.linear_proj",
    "linear_fc2": "mlp.linear_fc2",
}
COLUMN_PARALLEL = ("linear_qkv", "linear_fc1")
# HF module (short name) -> the Megatron linear that computes it; fused ones need all their parts.
HF_PARTS = {
    "linear_qkv": ("q_proj", "k_proj", "v_proj"),
    "linear_fc1": ("gate_proj", "up_proj"),
    "linear_proj": ("o_proj",),
    "linear_fc2": ("down_proj",),
}
ADAPTER_SUFFIX = "_lora"
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
log = logging.getLogger(__name__)


# ---------------------------------------------------------------- which linears


def _megatron_patterns(patterns: list[str], key: str) -> list[str]:
    """`patterns` with HF short names replaced by the Megatron linear computing them."""
    hf_to_megatron = {part: linear for linear, parts in HF_PARTS.items() for part in parts}
    named = {p for p in patterns if p in hf_to_megatron}
    out = [p for p in patterns if p not in hf_to_megatron]
    for linear, parts in HF_PARTS.items():
        given = [p for p in parts if p in named]
        if not given:
            continue
        if len(given) != len(parts):
            raise ValueError(
                f"{CONFIG_KEY}.{key}: {given} without {[p for p in parts if p not in given]}: the Megatron "
                f"backend computes {list(parts)} in one linear ({linear}) and adapts them together; "
                f"name all of them, or {linear!r}"
            )
        out.append(linear)
    return out


def adaptable_linears(num_layers: int) -> list[str]:
    """Global names of every linear LoRA can adapt, in model order."""
    return [f"decoder.layers.{layer}.{path}" for layer in range(num_layers) for path in LINEAR_PATHS.values()]


def select_targets(cfg: MegatronPeftConfig, num_layers: int) -> list[str]:
    """Global names of the linears to adapt (`decoder.layers.<L>.self_attention.linear_qkv`),
    in model order. Empty `target_modules`: all four linears of every layer, minus those matching
    an `exclude_modules` pattern. Patterns match as in nemo_rl/models/lora.py (the full name or
    a dotted suffix; `*` wildcards). Both lists at once are refused by the schema
    (`MegatronConfig`); here `target_modules` wins.

    Raises:
        ValueError: a pattern that matches nothing, an HF name of a fused projection without
            its partners, or nothing left to adapt.
    """
    candidates = adaptable_linears(num_layers)
    key = "target_modules" if cfg.target_modules else "exclude_modules"
    patterns = _megatron_patterns(cfg.target_modules or cfg.exclude_modules, key)
    for pattern in patterns:
        if not any(pattern_matches(pattern, name) for name in candidates):
            raise ValueError(
                f"{CONFIG_KEY}.{key}: {pattern!r} matches no adaptable linear; they are named like "
                f"{candidates[0]} (short names {list(LINEAR_PATHS)}, or the HF names "
                f"{[p for parts in HF_PARTS.values() for p in parts]})"
            )
    matched = [name for name in candidates if any(pattern_matches(p, name) for p in patterns)]
    selected = matched if cfg.target_modules else [name for name in candidates if name not in matched]
    if not selected:
        raise ValueError(f"{CONFIG_KEY}.exclude_modules={cfg.exclude_modules} leaves no linear to adapt")
    return selected


# ---------------------------------------------------------------- the adapter


class ParallelLoRAAdapter(torch.nn.Module):
    """The low-rank update of one tensor-parallel linear (module doc: shapes and reductions)."""

    def __init__(
        self,
        base_weight_OI: torch.Tensor,
        *,
        column_parallel: bool,
        cfg: MegatronPeftConfig,
        generator: torch.Generator,
        gated_linear_unit: bool = False,
    ):
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel.layers import (
            set_defaults_if_not_set_tensor_model_parallel_attributes,
            set_tensor_model_parallel_attributes,
        )

        super().__init__()
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        tp_size = parallel_state.get_tensor_model_parallel_world_size()
        out_local, in_local = base_weight_OI.shape
        in_full = in_local if column_parallel else in_local * tp_size
        A_RI = init_lora_A_(torch.empty(cfg.dim, in_full), cfg.lora_A_init_method, generator)
        if not column_parallel:
            A_RI = A_RI[:, tp_rank * in_local : (tp_rank + 1) * in_local]
        factory = dict(device=base_weight_OI.device, dtype=base_weight_OI.dtype)
        self.lora_A = torch.nn.Parameter(A_RI.to(**factory).contiguous())
        self.lora_B = torch.nn.Parameter(torch.zeros(out_local, cfg.dim, **factory))
        sharded, replicated, axis = (self.lora_B, self.lora_A, 0) if column_parallel else (self.lora_A, self.lora_B, 1)
        set_tensor_model_parallel_attributes(sharded, is_parallel=True, dim=axis, stride=1)
        set_defaults_if_not_set_tensor_model_parallel_attributes(replicated)
        self.column_parallel = column_parallel
        self.gated_linear_unit = gated_linear_unit
        self.scale = cfg.alpha / cfg.dim
        self.dropout_position = cfg.dropout_position
        self.dropout = torch.nn.Dropout(cfg.dropout) if cfg.dropout > 0 else torch.nn.Identity()

    def forward(self, x_SBI: torch.Tensor) -> torch.Tensor:
        from megatron.core.tensor_parallel.mappings import (
            copy_to_tensor_model_parallel_region,
            reduce_from_tensor_model_parallel_region,
        )

        if self.dropout_position == "pre":
            x_SBI = self.dropout(x_SBI)
        h_SBR = F.linear(x_SBI, self.lora_A)
        if self.column_parallel:
            h_SBR = copy_to_tensor_model_parallel_region(h_SBR)
        else:
            h_SBR = reduce_from_tensor_model_parallel_region(h_SBR)
        y_SBO = F.linear(h_SBR, self.lora_B)
        if self.dropout_position == "post":
            y_SBO = self.dropout(y_SBO)
        return self.scale * y_SBO

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None) -> dict:
        """dist_checkpointing entries: the sharded factor split over tensor-parallel ranks along
        the base weight's axis (linear_fc1's lora_B as [gate; up] halves, like its weight)."""
        from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        state = self.state_dict(prefix="", keep_vars=True)
        axis = {"lora_B": 0} if self.column_parallel else {"lora_A": 1}
        sharded = make_sharded_tensors_for_checkpoint(state, prefix, axis, sharded_offsets)
        if self.gated_linear_unit:
            key = f"{prefix}lora_B"
            singleton = (metadata or {}).get("singleton_local_shards", False)
            sharded[key] = apply_swiglu_sharded_factory(sharded[key], sharded_offsets, singleton)
        return sharded


def _normed_input(linear: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input the linear's matmul sees: Transformer Engine's fused-norm linears
    (`TELayerNormColumnParallelLinear`) normalise inside; the local spec's linears do not."""
    norm_weight = getattr(linear, "layer_norm_weight", None)
    if norm_weight is None:
        return x
    if getattr(linear, "zero_centered_gamma", False):
        norm_weight = norm_weight + 1
    if getattr(linear, "normalization", "RMSNorm") == "RMSNorm":
        return F.rms_norm(x, (x.shape[-1],), norm_weight, linear.eps)
    return F.layer_norm(x, (x.shape[-1],), norm_weight, getattr(linear, "layer_norm_bias", None), linear.eps)


def _add_adapter_output(adapter: ParallelLoRAAdapter):
    def hook(linear, args, output):
        out, bias = output
        return out + adapter(_normed_input(linear, args[0])), bias

    return hook


def apply_lora(model_chunks: list, cfg: MegatronPeftConfig, *, num_layers: int, seed: int) -> list[str]:
    """Freezes every parameter of the chunks and adds an adapter to each targeted linear this
    pipeline stage holds. Call it after the base weights are loaded and before Megatron's DDP
    wraps the chunks (its gradient buffers then hold the adapters only). Returns the global
    names of all targeted linears (every stage's)."""
    targets = select_targets(cfg, num_layers)
    targeted = set(targets)
    for chunk in model_chunks:
        for param in chunk.parameters():
            param.requires_grad_(False)
        for layer_module in chunk.decoder.layers:
            layer = layer_module.layer_number - 1
            for index, (short, path) in enumerate(LINEAR_PATHS.items()):
                name = f"decoder.layers.{layer}.{path}"
                if name not in targeted:
                    continue
                parent_path, _, child = path.rpartition(".")
                parent = layer_module.get_submodule(parent_path)
                linear = getattr(parent, child)
                generator = torch.Generator().manual_seed(seed * 1_000_003 + layer * 8 + index)
                adapter = ParallelLoRAAdapter(
                    linear.weight,
                    column_parallel=short in COLUMN_PARALLEL,
                    cfg=cfg,
                    generator=generator,
                    gated_linear_unit=short == "linear_fc1" and chunk.config.gated_linear_unit,
                )
                parent.add_module(child + ADAPTER_SUFFIX, adapter)
                linear.register_forward_hook(_add_adapter_output(adapter))
    log.info(
        "LoRA (Megatron): %d linears, dim %d, alpha %g (scale %g), dropout %g (%s)",
        len(targets), cfg.dim, cfg.alpha, cfg.alpha / cfg.dim, cfg.dropout, cfg.dropout_position,
    )
    return targets


def is_adapter_key(key: str) -> bool:
    """A state-dict key (or parameter name) of an adapter factor."""
    return hf_conversion.LORA_ADAPTER_PARAM.search(key) is not None


def adapters(model_chunk) -> dict[str, ParallelLoRAAdapter]:
    """{global name of the adapted linear: its adapter} of one chunk."""
    found = {}
    for name, module in model_chunk.named_modules():
        if isinstance(module, ParallelLoRAAdapter):
            layer = int(_LAYER.match(name).group(1))
            global_layer = model_chunk.decoder.layers[layer].layer_number - 1
            found[_LAYER.sub(f"decoder.layers.{global_layer}.", name)[: -len(ADAPTER_SUFFIX)]] = module
    return found


# ---------------------------------------------------------------- export


def peft_state_dict(model_chunks: list, hf_config) -> dict[str, torch.Tensor]:
    """The adapter under HF module names (`model.layers.0.self_attn.q_proj.lora_A.weight`), full
    tensors on the first rank of each model replica (TP rank 0 of pipeline stage 0), `{}` on
    the others. Collective over the model-parallel group."""
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    stage: dict[str, torch.Tensor] = {}
    for chunk in model_chunks:
        for linear, adapter in adapters(chunk).items():
            # Only the factor split over the tensor-parallel ranks is gathered; the other is
            # replicated, every rank holding all of it.
            if adapter.column_parallel:
                B_shards = hf_conversion.gather_tensor_parallel_shards(adapter.lora_B.detach())
            else:
                A_shards = hf_conversion.gather_tensor_parallel_shards(adapter.lora_A.detach())
            if tp_rank != 0:
                continue
            if adapter.column_parallel:
                # B's rows are the linear's output rows: split them as the weight's are.
                rows = hf_conversion.hf_tensors_from_tp_shards(f"{linear}.weight", B_shards, hf_config)
                for weight_name, B in rows.items():
                    module = weight_name.removesuffix(".weight")
                    # Each projection its own copy: safetensors refuses tensors sharing memory.
                    stage[f"{module}.lora_A.weight"] = adapter.lora_A.detach().cpu().clone()
                    stage[f"{module}.lora_B.weight"] = B.cpu()
            else:
                (weight_name, A), = hf_conversion.hf_tensors_from_tp_shards(f"{linear}.weight", A_shards, hf_config).items()
                module = weight_name.removesuffix(".weight")
                stage[f"{module}.lora_A.weight"] = A.cpu()
                stage[f"{module}.lora_B.weight"] = adapter.lora_B.detach().cpu()
    stage = hf_conversion.gather_pipeline_stages(stage)
    return stage if tp_rank == 0 else {}


def peft_target_modules(targets: list[str], num_layers: int) -> list[str]:
    """adapter_config.json's `target_modules` under HF module names, by the DTensor backend's
    rule (`nemo_rl.models.lora.adapter_target_modules`) over the adaptable linears."""
    def hf_names(linears: list[str]) -> list[str]:
        return [name for linear in linears for name in hf_conversion.hf_module_names(linear)]

    return adapter_target_modules(hf_names(adaptable_linears(num_layers)), hf_names(targets))


def save_adapter(model_chunks: list, hf_config, path: str | os.PathLike, cfg: MegatronPeftConfig, *, base_model: str, targets: list[str]) -> None:
    """Writes the PEFT adapter directory (adapter_config.json + adapter_model.safetensors), the
    files the DTensor backend writes, from one rank; collective, all return when it is written."""
    from megatron.core import parallel_state

    state = peft_state_dict(model_chunks, hf_config)
    if state and parallel_state.get_data_parallel_rank(with_context_parallel=True) == 0:
        lora_cfg = LoRAConfig(enabled=True, dim=cfg.dim, alpha=cfg.alpha, dropout=cfg.dropout, dropout_position=cfg.dropout_position)
        target_modules = peft_target_modules(targets, hf_config.num_hidden_layers)
        save_peft_adapter(state, path, lora_cfg, base_model=base_model, target_modules=target_modules)
    torch.distributed.barrier()


@contextmanager
def merged_into_base(model_chunks: list):
    """Within the block each adapted linear's weight is W + scale * B A (this rank's shard,
    computed in fp32); after it, the original weights are back, bit for bit."""
    saved = []
    with torch.no_grad():
        _merge(model_chunks, saved)
    try:
        yield
    finally:
        with torch.no_grad():
            for weight, original in saved:
                weight.copy_(original)


def _merge(model_chunks: list, saved: list) -> None:
    for chunk in model_chunks:
        for name, module in chunk.named_modules():
            if not isinstance(module, ParallelLoRAAdapter):
                continue
            parent_path, _, child = name.rpartition(".")
            weight = chunk.get_submodule(parent_path).get_submodule(child[: -len(ADAPTER_SUFFIX)]).weight
            saved.append((weight, weight.detach().clone()))
            delta_OI = module.scale * (module.lora_B.float() @ module.lora_A.float())
            weight.copy_((weight.float() + delta_OI).to(weight.dtype))
