"""LoRA: low-rank adapters on a Hugging Face model's linear layers, saved in PEFT's format.

Called on the loaded model before it is sharded:

    targets = apply_lora(model, lora_cfg)   # freezes every base weight, wraps the targets
    ...                                     # FSDP2, train: only lora_A / lora_B get gradients
    save_peft_adapter(adapter_state_dict, path, lora_cfg, base_model=..., target_modules=...)

A targeted `nn.Linear` becomes a `LoRALinear` that keeps the linear's own weight and bias
tensors under the same names, so the base keys of the state dict do not change; the adapter
adds `<module>.lora_A.weight` [dim, in] and `<module>.lora_B.weight` [out, dim]. PEFT names
the same tensors `base_model.model.<module>.lora_A.weight`, which is all `save_peft_adapter`
changes.

Which modules are targeted (`select_lora_targets`; docs/lora.md has the user's version). The
rules are NeMo AutoModel's (its ModuleMatcher, which NeMo RL uses), which decide in this order:
  1. the candidates are the model's `nn.Linear` modules;
  2. `target_modules` non-empty: the candidates matching any of its patterns
     (`match_all_linear` is then ignored); each pattern must match at least one candidate;
  3. else `match_all_linear`: every candidate except the output head
     (`model.get_output_embeddings()`, e.g. lm_head);
  4. else `exclude_modules` non-empty: every candidate, the output head included;
  5. else (all empty, `match_all_linear: false`): AutoModel's default, `target_modules: ['*_proj']`;
  6. minus those matching, or inside a module matching, any `exclude_modules` pattern
     (`mlp` excludes every linear of every MLP; each pattern must match some module);
  7. an empty result, or a target whose weight is shared with another module (a tied
     lm_head), is an error.
Where AutoModel refuses (target_modules with exclude_modules or with match_all_linear) this
build combines them as above.
A pattern matches a module when it equals, or (with `*`, `?`, `[...]`) fnmatch-matches,
the module's full name or any dotted suffix of it: `q_proj`, `self_attn.q_proj`, `*_proj`,
`*.layers.0.*.q_proj`, `layers.1[0-5].mlp.*`. `*` also matches dots.

Shape legend: B batch, T time, I in_features, O out_features, R rank (`dim`).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import os
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from nemo_rl.config.megatron_schema import MegatronPeftConfig
from nemo_rl.config.schema import LoRAConfig

log = logging.getLogger(__name__)

CONFIG_KEY = "policy.dtensor_cfg.lora_cfg"
PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
# What NeMo AutoModel adapts when target_modules, exclude_modules and match_all_linear are all unset.
AUTOMODEL_DEFAULT_TARGETS = ("*_proj",)


class LoRALinear(nn.Module):
    """A frozen linear plus a trainable low-rank update:

        y = x W^T + b + scale * lora(x),   scale = alpha / dim
        lora(x) = B(A(dropout(x)))   dropout_position "pre"
        lora(x) = dropout(B(A(x)))   dropout_position "post"

    A [R, I] starts xavier-normal (std sqrt(2 / (I + R))) or uniform (kaiming-uniform with
    a = sqrt(5), i.e. U(-1/sqrt(I), 1/sqrt(I)), torch's own Linear init); B [O, R] starts at
    zero, so the module equals the base linear until B trains.
    """

    def __init__(
        self,
        base: nn.Linear,
        *,
        dim: int,
        alpha: float,
        dropout: float = 0.0,
        dropout_position: str = "post",
        lora_A_init: str = "xavier",
    ):
        super().__init__()
        if dropout_position not in ("pre", "post"):
            raise ValueError(f"dropout_position must be 'pre' or 'post', got {dropout_position!r}")
        if lora_A_init not in ("xavier", "uniform"):
            raise ValueError(f"lora_A_init must be 'xavier' or 'uniform', got {lora_A_init!r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        # The base linear's own tensors, frozen: same names, same storage (ties survive).
        self.weight = base.weight
        self.weight.requires_grad_(False)
        if base.bias is not None:
            self.bias = base.bias
            self.bias.requires_grad_(False)
        else:
            self.register_parameter("bias", None)
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(self.in_features, dim, bias=False, **factory)
        self.lora_B = nn.Linear(dim, self.out_features, bias=False, **factory)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.dim, self.alpha = dim, alpha
        self.scale = alpha / dim
        self.dropout_position = dropout_position
        self.lora_A_init = lora_A_init
        self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        init_lora_A_(self.lora_A.weight, self.lora_A_init)
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x_BTI: torch.Tensor) -> torch.Tensor:
        y_BTO = F.linear(x_BTI, self.weight, self.bias)
        if self.dropout_position == "pre":
            lora_BTO = self.lora_B(self.lora_A(self.lora_dropout(x_BTI)))
        else:
            lora_BTO = self.lora_dropout(self.lora_B(self.lora_A(x_BTI)))
        return y_BTO + self.scale * lora_BTO

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, dim={self.dim}, alpha={self.alpha}, "
            f"dropout_position={self.dropout_position!r}"
        )


@torch.no_grad()
def init_lora_A_(A_RI: torch.Tensor, method: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Fills `A_RI` [R, I] in place, as both backends start their lora_A: "xavier" normal (std
    sqrt(2 / (I + R))) or "uniform" (kaiming-uniform with a = sqrt(5): U(-1/sqrt(I), 1/sqrt(I)),
    torch's own Linear init). `generator`: None draws from torch's global generator."""
    if method == "xavier":
        return nn.init.xavier_normal_(A_RI, generator=generator)
    return nn.init.kaiming_uniform_(A_RI, a=math.sqrt(5), generator=generator)


# ---------------------------------------------------------------- which modules


def pattern_matches(pattern: str, module_name: str) -> bool:
    """`pattern` equals or fnmatch-matches `module_name` or one of its dotted suffixes."""
    parts = module_name.split(".")
    suffixes = (".".join(parts[i:]) for i in range(len(parts)))
    if any(c in pattern for c in "*?["):
        return any(fnmatch.fnmatchcase(s, pattern) for s in suffixes)
    return any(s == pattern for s in suffixes)


def _within(pattern: str, module_name: str) -> bool:
    """`pattern` matches `module_name` or a module that contains it: excluding `mlp` or
    `layers.0` leaves out every linear layer inside them."""
    parts = module_name.split(".")
    return any(pattern_matches(pattern, ".".join(parts[:i])) for i in range(len(parts), 0, -1))


def linear_module_names(model: nn.Module) -> list[str]:
    """Names of the model's linear layers (a LoRALinear counts as the linear it wraps)."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, LoRALinear)) and not name.endswith((".lora_A", ".lora_B"))
    ]


def select_lora_targets(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """The full names of the linear modules `cfg` targets, in model order (rules: module doc)."""
    linear = linear_module_names(model)
    target_modules = cfg.target_modules
    if not target_modules and not cfg.match_all_linear and not cfg.exclude_modules:
        target_modules = list(AUTOMODEL_DEFAULT_TARGETS)
    if target_modules:
        why = "" if cfg.target_modules else (
            " (with target_modules and exclude_modules empty and match_all_linear false, LoRA adapts "
            f"{list(AUTOMODEL_DEFAULT_TARGETS)}, as NeMo AutoModel does)"
        )
        for pattern in target_modules:
            if not any(pattern_matches(pattern, name) for name in linear):
                raise ValueError(
                    f"{CONFIG_KEY}.target_modules: {pattern!r} matches no linear layer of "
                    f"{type(model).__name__}{why}. {_linear_names_hint(linear)}"
                )
        selected = [n for n in linear if any(pattern_matches(p, n) for p in target_modules)]
        how = f"target_modules={target_modules}"
    elif cfg.match_all_linear:
        head = _output_head_name(model)
        selected = [n for n in linear if n != head]
        how = f"match_all_linear (all linear layers but the output head {head!r})"
    else:
        selected = list(linear)
        how = "match_all_linear=false with exclude_modules only (all linear layers)"

    all_names = [name for name, _ in model.named_modules() if name]
    for pattern in cfg.exclude_modules:
        if not any(pattern_matches(pattern, name) for name in all_names):
            raise ValueError(
                f"{CONFIG_KEY}.exclude_modules: {pattern!r} matches no module of "
                f"{type(model).__name__}. {_linear_names_hint(linear)}"
            )
    selected = [n for n in selected if not any(_within(p, n) for p in cfg.exclude_modules)]
    if not selected:
        raise ValueError(
            f"{CONFIG_KEY}: {how} minus exclude_modules={cfg.exclude_modules} leaves no module "
            f"to adapt. {_linear_names_hint(linear)}"
        )

    shared = _shared_weight_owners(model)
    for name in selected:
        if name in shared:
            raise ValueError(
                f"{CONFIG_KEY}: {name!r} shares its weight with {shared[name]!r} (tied embeddings); "
                f"LoRA on it is not supported. Leave it out of target_modules or add it to exclude_modules"
            )
    return selected


def _output_head_name(model: nn.Module) -> str | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if module is head:
            return name
    return "lm_head" if hasattr(model, "lm_head") else None


def _shared_weight_owners(model: nn.Module) -> dict[str, str]:
    """{module name: another module holding the same weight} for tied weights."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter):
            owners.setdefault(id(weight), []).append(name)
    return {
        name: next(other for other in names if other != name)
        for names in owners.values()
        if len(names) > 1
        for name in names
    }


def _linear_names_hint(linear: list[str], limit: int = 4) -> str:
    short = sorted({name.rsplit(".", 1)[-1] for name in linear})
    examples = ", ".join(linear[:limit]) + (", ..." if len(linear) > limit else "")
    return f"Its linear layers are named like: {examples} (short names: {short})"


# ---------------------------------------------------------------- applying it


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Freezes every parameter of `model`, wraps each targeted linear in a LoRALinear (in
    place) and returns the targeted module names. Call it before sharding the model."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("apply_lora: the model already has LoRA adapters")
    targets = select_lora_targets(model, cfg)
    for param in model.parameters():
        param.requires_grad_(False)
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        lora = LoRALinear(
            getattr(parent, child),
            dim=cfg.dim,
            alpha=cfg.alpha,
            dropout=cfg.dropout,
            dropout_position=cfg.dropout_position,
            lora_A_init=cfg.lora_A_init,
        )
        setattr(parent, child, lora)
    log.info(
        "LoRA: %d modules (%s), dim %d, alpha %g (scale %g), dropout %g (%s), lora_A_init %s",
        len(targets), ", ".join(peft_target_modules(model, targets)), cfg.dim, cfg.alpha,
        cfg.alpha / cfg.dim, cfg.dropout, cfg.dropout_position, cfg.lora_A_init,
    )
    return targets  # the driver reports use_triton (describe_parameters)


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """{"trainable": ..., "total": ...}: parameter elements, a tied weight counted once.
    Call it before sharding (after, each rank holds a shard)."""
    params = list(model.parameters())  # deduplicated
    return {
        "trainable": sum(p.numel() for p in params if p.requires_grad),
        "total": sum(p.numel() for p in params),
    }


def describe_parameters(counts: dict[str, int], cfg: LoRAConfig | MegatronPeftConfig) -> list[str]:
    """Lines for the run's log: trainable vs total parameters and, with LoRA (either backend's
    section: `PolicyConfig.lora_settings()`), what runs it."""
    share = 100 * counts["trainable"] / max(counts["total"], 1)
    lines = [f"parameters: {counts['trainable']:,} trainable of {counts['total']:,} ({share:.2f}%)"]
    if cfg.enabled:
        lines[0] += f"; LoRA dim {cfg.dim}, alpha {cfg.alpha:g} on {counts.get('lora_modules', '?')} linear layers"
        if isinstance(cfg, LoRAConfig) and cfg.use_triton:
            lines.append(
                "LoRA: use_triton=true, but this build has no fused LoRA kernel; the adapters run as "
                "plain PyTorch matmuls (same results)"
            )
    return lines


def is_lora_key(key: str) -> bool:
    return key.endswith(LORA_SUFFIXES)


# ---------------------------------------------------------------- PEFT export


def peft_target_modules(model: nn.Module, targets: list[str]) -> list[str]:
    """`target_modules` for adapter_config.json of the linear layers `targets` of `model`
    (`adapter_target_modules`)."""
    return adapter_target_modules(linear_module_names(model), targets)


def adapter_target_modules(candidates: list[str], targets: Iterable[str]) -> list[str]:
    """`target_modules` for adapter_config.json: the short name (`q_proj`) where every candidate
    module of that name is targeted, else the full names of the targeted ones (in `candidates`'
    order), so that PEFT rebuilds exactly the adapted set. Sorted by short name."""
    by_short: dict[str, list[str]] = {}
    for name in candidates:
        by_short.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    targeted = set(targets)
    out: list[str] = []
    for short, names in sorted(by_short.items()):
        chosen = [n for n in names if n in targeted]
        if not chosen:
            continue
        out.extend([short] if len(chosen) == len(names) else chosen)
    return out


def peft_adapter_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The lora_A / lora_B tensors of a model state dict, under PEFT's key names."""
    return {
        PEFT_PREFIX + key: value.detach().to("cpu").contiguous()
        for key, value in state_dict.items()
        if is_lora_key(key)
    }


def save_peft_adapter(
    state_dict: dict[str, torch.Tensor],
    path: str | os.PathLike,
    cfg: LoRAConfig,
    *,
    base_model: str,
    target_modules: list[str],
) -> None:
    """Writes a PEFT LoRA adapter directory: adapter_config.json + adapter_model.safetensors.

    `state_dict` holds at least the full (unsharded) lora_A / lora_B tensors under the
    model's own names; other keys are ignored. `base_model` is recorded as
    `base_model_name_or_path` (a relative path to a local directory is made absolute).
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    tensors = peft_adapter_state_dict(state_dict)
    if not tensors:
        raise ValueError("save_peft_adapter: the state dict holds no lora_A / lora_B tensors")
    if os.path.isdir(base_model) and not os.path.isabs(base_model):
        base_model = os.path.abspath(base_model)
    alpha = int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha
    peft_config = LoraConfig(
        r=cfg.dim,
        lora_alpha=alpha,
        lora_dropout=cfg.dropout,
        target_modules=target_modules,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
    )
    os.makedirs(path, exist_ok=True)
    peft_config.save_pretrained(str(path))
    save_file(tensors, os.path.join(path, ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})


def read_adapter_config(path: str | os.PathLike) -> dict | None:
    """The adapter_config.json of a PEFT adapter directory, or None if `path` is not one."""
    config_file = os.path.join(path, ADAPTER_CONFIG_FILE)
    if not os.path.isfile(config_file):
        return None
    with open(config_file, encoding="utf-8") as handle:
        return json.load(handle)
