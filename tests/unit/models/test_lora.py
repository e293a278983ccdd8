"""nemo_rl.models.lora on a tiny Llama, in one process: the LoRA module's math and init,
which modules a config selects, parameter counts, and the PEFT / merged exports.

The distributed side (FSDP2 training, 1 vs 2 workers, checkpoints) is test_lora_worker.py.
"""

from __future__ import annotations

import json
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from safetensors import safe_open
from tests.unit.models.policy.policy_test_utils import VOCAB, save_tiny_llama
from torch import nn
from transformers import AutoModelForCausalLM

from nemo_rl.config.schema import LoRAConfig
from nemo_rl.models.lora import (
    LoRALinear,
    adapter_target_modules,
    apply_lora,
    init_lora_A_,
    parameter_counts,
    pattern_matches,
    peft_target_modules,
    save_peft_adapter,
    select_lora_targets,
)
from nemo_rl.models.policy.hf_export import shared_parameter_aliases

LAYERS = (0, 1)
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def _names(layers=LAYERS, attn=ATTN, mlp=MLP) -> set[str]:
    return {f"model.layers.{i}.self_attn.{m}" for i in layers for m in attn} | {
        f"model.layers.{i}.mlp.{m}" for i in layers for m in mlp
    }


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    return {
        "tied": save_tiny_llama(str(root / "tied")),
        "untied": save_tiny_llama(str(root / "untied"), tie_word_embeddings=False),
    }


def _load(model_dir) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def _input_ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- selection


@pytest.mark.parametrize(
    ("lora", "expected"),
    [
        ({}, _names()),  # match_all_linear: every linear but lm_head
        ({"target_modules": ["q_proj", "v_proj"]}, _names(attn=("q_proj", "v_proj"), mlp=())),
        ({"target_modules": ["*_proj"], "match_all_linear": False}, _names()),
        ({"target_modules": ["*.layers.0.*.q_proj"]}, _names(layers=(0,), attn=("q_proj",), mlp=())),
        ({"target_modules": ["self_attn.*"]}, _names(mlp=())),
        ({"target_modules": ["layers.1.mlp.down_proj"]}, _names(layers=(1,), attn=(), mlp=("down_proj",))),
        ({"exclude_modules": ["*.layers.1.*", "down_proj"]}, _names(layers=(0,), mlp=("gate_proj", "up_proj"))),
        ({"target_modules": ["mlp.*"], "exclude_modules": ["up_proj"]}, _names(attn=(), mlp=("gate_proj", "down_proj"))),
        # a parent module excludes every linear layer inside it
        ({"exclude_modules": ["layers.1"]}, _names(layers=(0,))),
        ({"exclude_modules": ["mlp"]}, _names(mlp=())),
    ],
)
def test_patterns_select_exactly_the_expected_modules(model_dirs, lora, expected):
    cfg = LoRAConfig(enabled=True, **lora)
    targets = select_lora_targets(_load(model_dirs["tied"]), cfg)
    assert set(targets) == expected
    assert len(targets) == len(expected)  # no duplicates


def test_explicit_target_modules_can_name_an_untied_output_head(model_dirs):
    cfg = LoRAConfig(enabled=True, target_modules=["lm_head"])
    assert select_lora_targets(_load(model_dirs["untied"]), cfg) == ["lm_head"]
    # match_all_linear still leaves it out
    assert "lm_head" not in select_lora_targets(_load(model_dirs["untied"]), LoRAConfig(enabled=True))


def test_pattern_matching_rules():
    name = "model.layers.1.self_attn.q_proj"
    assert pattern_matches("q_proj", name)
    assert pattern_matches("self_attn.q_proj", name)
    assert pattern_matches(name, name)
    assert not pattern_matches("proj", name)  # a suffix of whole dotted parts, not of characters
    assert not pattern_matches("attn.q_proj", name)
    assert not pattern_matches("layers.1", name)  # names the decoder layer, not its projections
    assert pattern_matches("*q_proj", name) and pattern_matches("*.layers.1.*", name)
    assert not pattern_matches("*.layers.1.*", "model.layers.10.self_attn.q_proj")
    assert pattern_matches("layers.1?.*", "model.layers.10.self_attn.q_proj")


@pytest.mark.parametrize(
    ("lora", "message"),
    [
        ({"target_modules": ["q_prj"]}, "'q_prj' matches no linear layer"),
        ({"target_modules": ["embed_tokens"]}, "'embed_tokens' matches no linear layer"),
        ({"exclude_modules": ["*.layers.7.*"]}, "'*.layers.7.*' matches no module"),
        ({"target_modules": ["q_proj"], "exclude_modules": ["self_attn.*"]}, "leaves no module"),
        ({"target_modules": ["lm_head"]}, "shares its weight with 'model.embed_tokens'"),
    ],
)
def test_selection_errors_name_the_pattern_and_existing_modules(model_dirs, lora, message):
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        select_lora_targets(_load(model_dirs["tied"]), LoRAConfig(enabled=True, **lora))
    if "matches no" in message:
        assert "model.layers.0.self_attn.q_proj" in str(error.value)
        assert "'down_proj'" in str(error.value)  # the short names that exist


# NeMo AutoModel's ModuleMatcher, which NeMo RL uses, with match_all_linear false:
#   exclude_modules only -> every linear layer (the output head included) except those excluded;
#   nothing given        -> target_modules ['*_proj'].
def test_exclude_only_without_match_all_linear_adapts_every_other_linear_layer(model_dirs):
    cfg = LoRAConfig(enabled=True, match_all_linear=False, exclude_modules=["*.layers.1.*", "down_proj"])
    targets = select_lora_targets(_load(model_dirs["untied"]), cfg)
    assert set(targets) == _names(layers=(0,), mlp=("gate_proj", "up_proj")) | {"lm_head"}
    # a tied head cannot carry its own adapter: the error says to exclude it
    with pytest.raises(ValueError, match=re.escape("'lm_head' shares its weight with 'model.embed_tokens'")):
        select_lora_targets(_load(model_dirs["tied"]), cfg)
    tied_cfg = LoRAConfig(enabled=True, match_all_linear=False, exclude_modules=["lm_head", "mlp"])
    assert set(select_lora_targets(_load(model_dirs["tied"]), tied_cfg)) == _names(mlp=())


def test_nothing_selected_means_automodels_default_of_every_proj_layer(model_dirs):
    cfg = LoRAConfig(enabled=True, match_all_linear=False)
    assert set(select_lora_targets(_load(model_dirs["untied"]), cfg)) == _names()  # not lm_head


def test_automodels_default_on_a_model_without_proj_layers_says_where_the_pattern_came_from():
    class NoProjections(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 4)

    with pytest.raises(ValueError, match=re.escape("'*_proj' matches no linear layer")) as error:
        select_lora_targets(NoProjections(), LoRAConfig(enabled=True, match_all_linear=False))
    assert "as NeMo AutoModel does" in str(error.value)


# ---------------------------------------------------------------- applying it


def test_step0_logits_equal_the_base_model_and_only_adapters_train(model_dirs):
    base = _load(model_dirs["tied"])
    model = _load(model_dirs["tied"])
    cfg = LoRAConfig(enabled=True, exclude_modules=["*.layers.1.mlp.*"], dim=4, alpha=8, dropout=0.3)
    targets = apply_lora(model, cfg)
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == len(targets) == 11

    ids = _input_ids()
    model.train()  # dropout active: the zero B still makes the update exactly zero
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base(ids).logits)

    # Trainable = the analytic count of the targeted modules: dim * (in + out) each.
    expected = sum(
        cfg.dim * (m.in_features + m.out_features) for name, m in base.named_modules() if name in set(targets)
    )
    counts = parameter_counts(model)
    assert counts["trainable"] == expected == 2944
    assert counts["total"] == parameter_counts(base)["total"] + expected
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{t}.lora_{ab}.weight" for t in targets for ab in "AB"}

    # Base keys are unchanged and the tie survives.
    base_keys = set(base.state_dict())
    assert base_keys <= set(model.state_dict())
    assert shared_parameter_aliases(model) == shared_parameter_aliases(base) == {"lm_head.weight": "model.embed_tokens.weight"}


def test_apply_lora_twice_is_an_error(model_dirs):
    model = _load(model_dirs["tied"])
    apply_lora(model, LoRAConfig(enabled=True))
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_lora(model, LoRAConfig(enabled=True))


# ---------------------------------------------------------------- the module


def _lora_linear(dropout_position: str, *, bias: bool = True) -> LoRALinear:
    torch.manual_seed(0)
    layer = LoRALinear(
        nn.Linear(6, 5, bias=bias), dim=3, alpha=6.0, dropout=0.5, dropout_position=dropout_position
    )
    with torch.no_grad():
        layer.lora_B.weight.normal_()  # as if trained, so the adapter contributes
    return layer


@pytest.mark.parametrize("position", ["pre", "post"])
def test_dropout_position_matches_a_hand_computation(position):
    layer = _lora_linear(position)
    x = torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(1))
    W, b = layer.weight.detach(), layer.bias.detach()
    A, B = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
    base = x @ W.T + b
    scale = 6.0 / 3

    layer.train()
    torch.manual_seed(123)
    got = layer(x).detach()
    # The same draws, made by hand: a 0 / (1 / (1 - p)) mask on the input (pre) or on the
    # LoRA branch's output (post).
    torch.manual_seed(123)
    if position == "pre":
        mask = F.dropout(torch.ones(2, 4, 6), 0.5)
        want = base + scale * ((x * mask) @ A.T @ B.T)
    else:
        mask = F.dropout(torch.ones(2, 4, 5), 0.5)
        want = base + scale * ((x @ A.T @ B.T) * mask)
        assert torch.equal(got[mask == 0], base[mask == 0])  # a dropped output keeps the base only
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert 0 < (mask == 0).sum() < mask.numel()

    layer.eval()  # no dropout at inference: both positions are the plain LoRA linear
    torch.testing.assert_close(layer(x).detach(), base + scale * (x @ A.T @ B.T), rtol=1e-6, atol=1e-6)


def test_pre_and_post_dropout_differ_in_training():
    x = torch.randn(2, 4, 6)
    pre, post = _lora_linear("pre"), _lora_linear("post")
    torch.testing.assert_close(pre.lora_A.weight, post.lora_A.weight)  # same init (seed 0)
    torch.manual_seed(5)
    y_pre = pre(x)
    torch.manual_seed(5)
    y_post = post(x)
    assert not torch.allclose(y_pre, y_post)


def test_lora_A_init_distributions_and_zero_B():
    in_features, dim = 1024, 16
    torch.manual_seed(0)
    xavier = LoRALinear(nn.Linear(in_features, 256), dim=dim, alpha=32, lora_A_init="xavier")
    uniform = LoRALinear(nn.Linear(in_features, 256), dim=dim, alpha=32, lora_A_init="uniform")
    for layer in (xavier, uniform):
        assert torch.count_nonzero(layer.lora_B.weight) == 0

    # uniform: U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform, a=sqrt(5)): bounded, fills the range.
    A = uniform.lora_A.weight.detach()
    bound = 1 / math.sqrt(in_features)
    assert A.abs().max() <= bound
    assert A.abs().max() > 0.99 * bound
    assert A.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.03)

    # xavier: normal with std sqrt(2 / (in + dim)); a normal's tails pass 3 std, a uniform's never
    # pass sqrt(3) std.
    A = xavier.lora_A.weight.detach()
    std = math.sqrt(2 / (in_features + dim))
    assert A.std().item() == pytest.approx(std, rel=0.03)
    assert A.mean().abs().item() < 0.05 * std
    assert A.abs().max() > 3 * std
    assert (A.abs() <= std).float().mean().item() == pytest.approx(0.6827, abs=0.02)


def test_lora_A_init_from_a_given_generator_draws_the_documented_distribution():
    """The Megatron backend seeds each adapter's lora_A from its own generator: the same
    draws as torch's normal_ / uniform_ with the documented std and bound."""
    in_features, dim = 96, 4
    xavier = init_lora_A_(torch.empty(dim, in_features), "xavier", torch.Generator().manual_seed(5))
    want = torch.empty(dim, in_features).normal_(0.0, math.sqrt(2 / (in_features + dim)), generator=torch.Generator().manual_seed(5))
    assert torch.equal(xavier, want)
    uniform = init_lora_A_(torch.empty(dim, in_features), "uniform", torch.Generator().manual_seed(5))
    bound = 1 / math.sqrt(in_features)
    want = torch.empty(dim, in_features).uniform_(-bound, bound, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(uniform, want, rtol=1e-6, atol=0)


def test_adapter_config_names_a_short_name_only_where_every_module_of_it_is_adapted():
    candidates = [f"model.layers.{layer}.self_attn.{p}_proj" for layer in range(3) for p in ("q", "o")]
    targets = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.2.self_attn.q_proj"]
    assert adapter_target_modules(candidates, targets) == ["q_proj"]
    assert adapter_target_modules(candidates, [*targets, "model.layers.1.self_attn.o_proj"]) == [
        "model.layers.1.self_attn.o_proj",
        "q_proj",
    ]


def test_bias_is_kept_frozen_and_a_linear_without_bias_works():
    with_bias, without = _lora_linear("post"), _lora_linear("post", bias=False)
    assert not with_bias.bias.requires_grad and not with_bias.weight.requires_grad
    assert without.bias is None
    assert [n for n, p in without.named_parameters() if p.requires_grad] == ["lora_A.weight", "lora_B.weight"]


# ---------------------------------------------------------------- exports


def _trained_lora_model(model_dir, cfg: LoRAConfig):
    model = _load(model_dir)
    targets = apply_lora(model, cfg)
    torch.manual_seed(3)
    with torch.no_grad():  # stand-in for training: every adapter tensor moves
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    return model.eval(), targets


def test_peft_adapter_loads_with_the_trained_logits(model_dirs, tmp_path):
    model_dir = model_dirs["tied"]
    cfg = LoRAConfig(enabled=True, exclude_modules=["*.layers.1.mlp.*"], dim=4, alpha=8, dropout=0.1)
    model, targets = _trained_lora_model(model_dir, cfg)
    ids = _input_ids(1)
    with torch.no_grad():
        want = model(ids).logits

    adapter_dir = tmp_path / "hf"
    target_modules = peft_target_modules(model, targets)
    save_peft_adapter(model.state_dict(), adapter_dir, cfg, base_model=model_dir, target_modules=target_modules)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8, 0.1)
    assert config["base_model_name_or_path"] == model_dir
    # layer 1's MLP is excluded, so those short names are listed by full name.
    assert sorted(config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj"] + [f"model.layers.0.mlp.{m}" for m in MLP]
    )
    with safe_open(adapter_dir / "adapter_model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert keys == {f"base_model.model.{t}.lora_{ab}.weight" for t in targets for ab in "AB"}

    peft_model = PeftModel.from_pretrained(_load(model_dir), adapter_dir).eval()
    adapted = {n.removeprefix("base_model.model.").removesuffix(".lora_A") for n, _ in peft_model.named_modules() if n.endswith(".lora_A")}
    assert adapted == set(targets)  # PEFT rebuilt exactly the adapted set
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, want, rtol=1e-5, atol=1e-5)


def test_relative_base_model_path_is_recorded_absolute(model_dirs, tmp_path, monkeypatch):
    cfg = LoRAConfig(enabled=True, target_modules=["q_proj"])
    model, targets = _trained_lora_model(model_dirs["tied"], cfg)
    monkeypatch.chdir(tmp_path.parent)
    relative = os.path.relpath(model_dirs["tied"])
    save_peft_adapter(model.state_dict(), tmp_path / "a", cfg, base_model=relative, target_modules=["q_proj"])
    recorded = json.loads((tmp_path / "a" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == model_dirs["tied"]
    save_peft_adapter(model.state_dict(), tmp_path / "b", cfg, base_model="org/not-local", target_modules=["q_proj"])
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/not-local"
