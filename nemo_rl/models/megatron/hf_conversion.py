"""Hugging Face <-> megatron-core weights for the Llama-style families of `model_builder`.

A hand-written mapping (docs/megatron.md says why): each Megatron parameter is computed from one
to three HF tensors, and back.

    HF (per layer L)                                Megatron (global layer L)
    input_layernorm                                 input_layernorm (TE: linear_qkv.layer_norm_weight)
    self_attn.{q,k,v}_proj (weight, bias)           self_attention.linear_qkv: per KV group g,
                                                      [q heads of g; k_g; v_g] stacked on rows
    self_attn.{q,k}_norm                            self_attention.{q,k}_layernorm
    self_attn.o_proj                                self_attention.linear_proj
    post_attention_layernorm                        pre_mlp_layernorm (TE: linear_fc1.layer_norm_weight)
    mlp.gate_proj, mlp.up_proj                      mlp.linear_fc1: [gate; up] rows
    mlp.down_proj                                   mlp.linear_fc2
    model.embed_tokens / model.norm / lm_head       embedding.word_embeddings / decoder.final_layernorm / output_layer

Tensor parallelism: linear_qkv and linear_fc1 are column-parallel (rank r holds KV groups
[r*G/tp, (r+1)*G/tp) with their query heads, and rows [r*F/tp, (r+1)*F/tp) of both gate and up,
packed per rank), linear_proj and linear_fc2 row-parallel (a block of input columns), the
embedding and output layer split by vocabulary rows (padded, see `model_builder.padded_vocab_size`),
norms replicated. Each of these is a contiguous block of every HF tensor, so a rank reads only its
blocks from the safetensors files (`safe_open(...).get_slice`).
"""

from __future__ import annotations

import json
import os
import re
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from nemo_rl.models.megatron.model_builder import head_dim, padded_vocab_size
from nemo_rl.models.policy.hf_export import INDEX_FILE, save_model_files

# Megatron parameter names (relative to a model chunk, layer index global) -> HF names.
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
# LoRA adapter factors (models/megatron/lora.py) live beside the linears they adapt.
LORA_ADAPTER_PARAM = re.compile(r"_lora\.lora_[AB]$")
_LAYER_PARAMS = {
    "input_layernorm.weight": "input_layernorm",
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm",
    "self_attention.linear_qkv.weight": "qkv",
    "self_attention.linear_qkv.bias": "qkv",
    "self_attention.q_layernorm.weight": "replicated",
    "self_attention.k_layernorm.weight": "replicated",
    "self_attention.linear_proj.weight": "columns",
    "pre_mlp_layernorm.weight": "post_attention_layernorm",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm",
    "mlp.linear_fc1.weight": "gate_up",
    "mlp.linear_fc2.weight": "columns",
}
_LAYER_MODULES = {
    "self_attention.linear_qkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    "self_attention.linear_proj": ["self_attn.o_proj"],
    "self_attention.q_layernorm": ["self_attn.q_norm"],
    "self_attention.k_layernorm": ["self_attn.k_norm"],
    "mlp.linear_fc1": ["mlp.gate_proj", "mlp.up_proj"],
    "mlp.linear_fc2": ["mlp.down_proj"],
    "input_layernorm": ["input_layernorm"],
    "pre_mlp_layernorm": ["post_attention_layernorm"],
}
_TOP_MODULES = {
    "embedding.word_embeddings": ["model.embed_tokens"],
    "decoder.final_layernorm": ["model.norm"],
    "output_layer": ["lm_head"],
}


def hf_module_names(megatron_module_name: str) -> list[str]:
    """HF module names computed from one Megatron module (global layer index), e.g.
    `decoder.layers.3.self_attention.linear_qkv` -> `model.layers.3.self_attn.{q,k,v}_proj`.

    Raises:
        KeyError: not a module of the supported families.
    """
    if megatron_module_name in _TOP_MODULES:
        return list(_TOP_MODULES[megatron_module_name])
    match = _LAYER.match(megatron_module_name)
    if match and match.group(2) in _LAYER_MODULES:
        layer, rest = match.groups()
        return [f"model.layers.{layer}.{name}" for name in _LAYER_MODULES[rest]]
    raise KeyError(f"{megatron_module_name!r} is not a Megatron module with a Hugging Face counterpart")


def hf_module_name(megatron_module_name: str) -> str:
    """The one HF module of a Megatron module that has exactly one (`linear_proj` -> `o_proj`,
    `linear_fc2` -> `down_proj`, norms, embeddings); a fused module raises (see `hf_module_names`)."""
    names = hf_module_names(megatron_module_name)
    if len(names) != 1:
        raise KeyError(f"{megatron_module_name!r} fuses {names}; use hf_module_names")
    return names[0]


def megatron_module_name(hf_module_name: str) -> str:
    """The Megatron module holding an HF module, e.g. `model.layers.3.self_attn.k_proj` ->
    `decoder.layers.3.self_attention.linear_qkv`. LoRA target names map through this.

    Raises:
        KeyError: not a module of the supported families.
    """
    for megatron_name, hf_names in _TOP_MODULES.items():
        if hf_module_name in hf_names:
            return megatron_name
    match = re.match(r"^model\.layers\.(\d+)\.(.+)$", hf_module_name)
    if match:
        layer, rest = match.groups()
        for megatron_rest, hf_rests in _LAYER_MODULES.items():
            if rest in hf_rests:
                return f"decoder.layers.{layer}.{megatron_rest}"
    raise KeyError(f"{hf_module_name!r} is not a Hugging Face module of the supported families")


@dataclass(frozen=True)
class _Layout:
    """Sizes and this rank's tensor-parallel position."""

    tp_rank: int
    tp_size: int
    hidden: int
    heads: int
    groups: int
    head_dim: int
    ffn: int
    vocab: int
    tied: bool

    @property
    def heads_per_group(self) -> int:
        return self.heads // self.groups

    @property
    def padded_vocab(self) -> int:
        return padded_vocab_size(self.vocab, self.tp_size)


def _layout(hf_config, tp_rank: int, tp_size: int) -> _Layout:
    return _Layout(
        tp_rank=tp_rank,
        tp_size=tp_size,
        hidden=hf_config.hidden_size,
        heads=hf_config.num_attention_heads,
        groups=hf_config.num_key_value_heads or hf_config.num_attention_heads,
        head_dim=head_dim(hf_config),
        ffn=hf_config.intermediate_size,
        vocab=hf_config.vocab_size,
        tied=bool(getattr(hf_config, "tie_word_embeddings", False)),
    )


class _HFTensors:
    """Blocks of rows (dim 0) or columns (dim 1) of HF tensors, from a state dict or from the
    safetensors files of a model directory (read lazily: only the requested block)."""

    def __init__(self, source: str | os.PathLike | dict[str, torch.Tensor], stack: ExitStack):
        self._state = source if isinstance(source, dict) else None
        self._stack = stack
        self._files: dict[str, object] = {}
        if self._state is None:
            self._dir = Path(source)
            self._file_of = self._index(self._dir)

    @staticmethod
    def _index(model_dir: Path) -> dict[str, str]:
        from safetensors import safe_open

        index = model_dir / INDEX_FILE
        if index.exists():
            return json.loads(index.read_text())["weight_map"]
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{model_dir}: no *.safetensors files (the Megatron backend loads safetensors checkpoints)")
        file_of = {}
        for f in files:
            with safe_open(f, framework="pt") as handle:
                file_of.update(dict.fromkeys(handle.keys(), f.name))
        return file_of

    def has(self, name: str) -> bool:
        return name in (self._state if self._state is not None else self._file_of)

    def block(self, name: str, dim: int = 0, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        if not self.has(name):
            where = "the given state dict" if self._state is not None else str(self._dir)
            raise KeyError(f"Hugging Face tensor {name!r} not found in {where}")
        index = (slice(start, stop),) if dim == 0 else (slice(None), slice(start, stop))
        if self._state is not None:
            return self._state[name][index]
        return self._open(self._file_of[name]).get_slice(name)[index]

    def _open(self, file_name: str):
        from safetensors import safe_open

        if file_name not in self._files:
            self._files[file_name] = self._stack.enter_context(safe_open(self._dir / file_name, framework="pt"))
        return self._files[file_name]


def _rank_rows(total: int, lay: _Layout) -> tuple[int, int]:
    per_rank = total // lay.tp_size
    return lay.tp_rank * per_rank, (lay.tp_rank + 1) * per_rank


def _vocab_block(hf: _HFTensors, name: str, lay: _Layout) -> torch.Tensor:
    per_rank = lay.padded_vocab // lay.tp_size
    start = lay.tp_rank * per_rank
    stop = min(start + per_rank, lay.vocab)
    rows = hf.block(name, 0, start, stop) if stop > start else hf.block(name, 0, 0, 0)
    if rows.shape[0] < per_rank:  # padding rows: zero
        rows = torch.cat([rows, rows.new_zeros(per_rank - rows.shape[0], *rows.shape[1:])])
    return rows


def _qkv_block(hf: _HFTensors, prefix: str, suffix: str, lay: _Layout) -> torch.Tensor:
    """This rank's KV groups, each as [its query heads; its key head; its value head] rows."""
    groups = lay.groups // lay.tp_size
    g0 = lay.tp_rank * groups
    q_rows = lay.heads_per_group * lay.head_dim
    q = hf.block(f"{prefix}.q_proj.{suffix}", 0, g0 * q_rows, (g0 + groups) * q_rows)
    k = hf.block(f"{prefix}.k_proj.{suffix}", 0, g0 * lay.head_dim, (g0 + groups) * lay.head_dim)
    v = hf.block(f"{prefix}.v_proj.{suffix}", 0, g0 * lay.head_dim, (g0 + groups) * lay.head_dim)
    trailing = q.shape[1:]
    qkv = torch.cat(
        [q.reshape(groups, q_rows, *trailing), k.reshape(groups, lay.head_dim, *trailing), v.reshape(groups, lay.head_dim, *trailing)],
        dim=1,
    )
    return qkv.reshape(-1, *trailing)


def _hf_block_for(name: str, hf: _HFTensors, lay: _Layout, pre_process: bool) -> torch.Tensor | None:
    """This rank's block of the Megatron parameter `name` (global layer index), from HF tensors.
    None: a parameter with no HF counterpart to load (the tied output layer of the first stage)."""
    if name == "embedding.word_embeddings.weight":
        return _vocab_block(hf, "model.embed_tokens.weight", lay)
    if name == "output_layer.weight":
        if lay.tied:
            # One stage: the same parameter as the embedding. Last of several: a copy of it.
            return None if pre_process else _vocab_block(hf, "model.embed_tokens.weight", lay)
        return _vocab_block(hf, "lm_head.weight", lay)
    if name == "decoder.final_layernorm.weight":
        return hf.block("model.norm.weight")
    match = _LAYER.match(name)
    if not match or match.group(2) not in _LAYER_PARAMS:
        raise KeyError(f"Megatron parameter {name!r} has no Hugging Face counterpart (nemo_rl/models/megatron/hf_conversion.py)")
    layer, rest = match.groups()
    prefix = f"model.layers.{layer}"
    kind = _LAYER_PARAMS[rest]
    if kind in ("input_layernorm", "post_attention_layernorm"):
        return hf.block(f"{prefix}.{kind}.weight")
    if kind == "replicated":
        return hf.block(f"{prefix}.{_LAYER_MODULES[rest.rsplit('.', 1)[0]][0]}.weight")
    if kind == "qkv":
        return _qkv_block(hf, f"{prefix}.self_attn", rest.rsplit(".", 1)[1], lay)
    if kind == "gate_up":
        start, stop = _rank_rows(lay.ffn, lay)
        return torch.cat([hf.block(f"{prefix}.mlp.gate_proj.weight", 0, start, stop), hf.block(f"{prefix}.mlp.up_proj.weight", 0, start, stop)])
    # Row-parallel: a block of input columns.
    hf_name = f"{prefix}.{_LAYER_MODULES[rest.rsplit('.', 1)[0]][0]}.weight"
    total = lay.heads * lay.head_dim if "linear_proj" in rest else lay.ffn
    start, stop = _rank_rows(total, lay)
    return hf.block(hf_name, 1, start, stop)


def global_parameter_names(model_chunk) -> dict[str, torch.nn.Parameter]:
    """The chunk's parameters by name, the layer index made global (`decoder.layers.<L>` with L
    the HF layer number), as the mapping functions here expect."""
    named = {}
    for name, param in model_chunk.named_parameters():
        match = _LAYER.match(name)
        if match:
            layer = model_chunk.decoder.layers[int(match.group(1))].layer_number - 1
            name = f"decoder.layers.{layer}.{match.group(2)}"
        named[name] = param
    return named


def _tp_rank_and_size() -> tuple[int, int]:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()


@torch.no_grad()
def load_hf_weights_into(model_chunks: list, hf_model_dir_or_state: str | os.PathLike | dict[str, torch.Tensor], hf_config) -> None:
    """Copy this rank's blocks of the HF weights into its Megatron model chunks (every chunk of
    this pipeline rank: one, or one per virtual stage). Reads only those blocks from the
    safetensors files of a directory; a state dict is sliced in memory.

    Raises:
        KeyError: an HF tensor is missing, or a Megatron parameter has no HF counterpart.
        ValueError: a block's shape differs from the Megatron parameter's (a config that does not
            describe these weights).
    """
    lay = _layout(hf_config, *_tp_rank_and_size())
    with ExitStack() as stack:
        hf = _HFTensors(hf_model_dir_or_state, stack)
        for chunk in model_chunks:
            for name, param in global_parameter_names(chunk).items():
                block = _hf_block_for(name, hf, lay, pre_process=chunk.pre_process)
                if block is None:
                    continue
                if block.shape != param.shape:
                    raise ValueError(
                        f"Megatron parameter {name} has shape {tuple(param.shape)} on tensor-parallel rank "
                        f"{lay.tp_rank}, but the Hugging Face weights give {tuple(block.shape)}: does config.json describe these weights?"
                    )
                param.copy_(block)


def gather_tensor_parallel_shards(shard: torch.Tensor) -> list[torch.Tensor]:
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return [shard]
    shards = [torch.empty_like(shard) for _ in range(parallel_state.get_tensor_model_parallel_world_size())]
    torch.distributed.all_gather(shards, shard.contiguous(), group=group)
    return shards


def hf_tensors_from_tp_shards(name: str, shards: list[torch.Tensor], hf_config) -> dict[str, torch.Tensor]:
    """The HF tensors (HF names) computed from the tensor-parallel shards of the Megatron
    parameter `name` (global layer index). Any tensor laid out like that parameter's rows or
    columns works: LoRA's factors are split with it."""
    return _hf_tensors_from(name, shards, _layout(hf_config, 0, len(shards)))


def _hf_tensors_from(name: str, shards: list[torch.Tensor], lay: _Layout) -> dict[str, torch.Tensor]:
    """The full HF tensors computed by the tensor-parallel shards (rank order) of one Megatron parameter."""
    if name == "embedding.word_embeddings.weight":
        return {"model.embed_tokens.weight": torch.cat(shards)[: lay.vocab]}
    if name == "output_layer.weight":
        return {} if lay.tied else {"lm_head.weight": torch.cat(shards)[: lay.vocab]}
    if name == "decoder.final_layernorm.weight":
        return {"model.norm.weight": shards[0]}
    layer, rest = _LAYER.match(name).groups()
    prefix = f"model.layers.{layer}"
    kind = _LAYER_PARAMS[rest]
    module = rest.rsplit(".", 1)[0]
    if kind in ("input_layernorm", "post_attention_layernorm"):
        return {f"{prefix}.{kind}.weight": shards[0]}
    if kind == "replicated":
        return {f"{prefix}.{_LAYER_MODULES[module][0]}.weight": shards[0]}
    if kind == "qkv":
        suffix = rest.rsplit(".", 1)[1]
        q_rows = lay.heads_per_group * lay.head_dim
        trailing = shards[0].shape[1:]
        groups = torch.cat(shards).reshape(lay.groups, q_rows + 2 * lay.head_dim, *trailing)
        q, k, v = groups.split([q_rows, lay.head_dim, lay.head_dim], dim=1)
        return {
            f"{prefix}.self_attn.q_proj.{suffix}": q.reshape(-1, *trailing),
            f"{prefix}.self_attn.k_proj.{suffix}": k.reshape(-1, *trailing),
            f"{prefix}.self_attn.v_proj.{suffix}": v.reshape(-1, *trailing),
        }
    if kind == "gate_up":
        gates, ups = zip(*(shard.chunk(2) for shard in shards), strict=True)
        return {f"{prefix}.mlp.gate_proj.weight": torch.cat(gates), f"{prefix}.mlp.up_proj.weight": torch.cat(ups)}
    return {f"{prefix}.{_LAYER_MODULES[module][0]}.weight": torch.cat(shards, dim=1)}


@torch.no_grad()
def megatron_to_hf_state_dict(model_chunks: list, hf_config) -> dict[str, torch.Tensor]:
    """The full HF state dict (HF names and layouts, CPU tensors in the parameters' dtype) of the
    model whose pipeline stages and tensor-parallel shards the ranks hold.

    Collective: every rank of the model-parallel group calls it. The result is complete on the
    first rank of each model replica (tensor-parallel rank 0 of pipeline stage 0), which is where
    it is returned; every other rank gets `{}`. With tied embeddings there is no `lm_head.weight`,
    as in an HF checkpoint.
    """
    lay = _layout(hf_config, *_tp_rank_and_size())
    stage_tensors: dict[str, torch.Tensor] = {}
    for chunk in model_chunks:
        for name, param in global_parameter_names(chunk).items():
            if LORA_ADAPTER_PARAM.search(name):  # not the base model's; models/megatron/lora.py exports them
                continue
            shards = gather_tensor_parallel_shards(param.detach())
            if lay.tp_rank == 0:
                stage_tensors.update({k: v.cpu() for k, v in _hf_tensors_from(name, shards, lay).items()})
    # One pipeline group per tensor-parallel rank; only rank 0's carries tensors.
    stage_tensors = gather_pipeline_stages(stage_tensors)
    return stage_tensors if lay.tp_rank == 0 else {}


def gather_pipeline_stages(stage_tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every pipeline stage's `stage_tensors` (each stage its own keys) merged on the first
    stage; `{}` on the others. Collective over this rank's pipeline-parallel group."""
    from megatron.core import parallel_state

    stages = parallel_state.get_pipeline_model_parallel_world_size()
    if stages == 1:
        return stage_tensors
    group = parallel_state.get_pipeline_model_parallel_group()
    first = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    gathered = [None] * stages if first else None
    torch.distributed.gather_object(stage_tensors, gathered, dst=torch.distributed.get_global_rank(group, 0), group=group)
    if not first:
        return {}
    return {k: v for stage in gathered for k, v in stage.items()}


def save_hf_model(
    model_chunks: list,
    hf_config,
    out_dir: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_size: str = "5GB",
    generation_config=None,
) -> None:
    """Write a Hugging Face model directory (config.json + safetensors shards, with an index when
    there are several, and generation_config.json when `generation_config` is given) that
    `AutoModelForCausalLM.from_pretrained(out_dir)` loads.

    Collective, like `megatron_to_hf_state_dict`; one rank writes (tensor-parallel rank 0 of
    pipeline stage 0 of data-parallel replica 0); all return once the directory is complete.
    """
    from megatron.core import parallel_state

    state = megatron_to_hf_state_dict(model_chunks, hf_config)
    writer = bool(state) and parallel_state.get_data_parallel_rank(with_context_parallel=True) == 0
    if writer:
        _write_safetensors(state, Path(out_dir), dtype, max_shard_size)
        save_model_files(str(out_dir), config=hf_config, dtype=dtype, generation_config=generation_config, trust_remote_code=False)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _write_safetensors(state: dict[str, torch.Tensor], out_dir: Path, dtype: torch.dtype, max_shard_size: str) -> None:
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.to(dtype).contiguous() for k, v in state.items()}
    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
    for file_name, names in split.filename_to_tensors.items():
        save_file({n: state[n] for n in names}, out_dir / file_name, metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())}, "weight_map": split.tensor_to_filename}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2))
