"""Every family with a tensor-parallel plan trains under TP 2 (with and without sequence
parallelism) exactly like one process: per-step losses, gradient norms and final weights of a
2-step fp32 run equal the single-process reference (rel 1e-5). Tiny random models built from
configs: Qwen3 and Gemma 3 (per-head q/k norms), Gemma 2 (extra norms, logit soft-capping),
Phi-3 (fused qkv_proj and gate_up_proj, outputs gathered whole), tied (Gemma 2, Gemma 3, Phi-3)
and untied heads. Tied Gemma 3 is held to the float32 reference's own accuracy instead (its test
says why)."""

from __future__ import annotations

import pytest
import torch
from tests.unit.distributed_helpers import run_ranks
from tests.unit.models.policy.policy_test_utils import VOCAB, make_batch, reference_training
from tests.unit.models.policy.test_parallel_layouts import STEPS, _compare, _train
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, Phi3Config, Qwen3Config

SHAPE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
)
FAMILIES = {
    "qwen3_untied": lambda: Qwen3Config(tie_word_embeddings=False, **SHAPE),
    "gemma2_tied": lambda: Gemma2Config(tie_word_embeddings=True, attn_implementation="eager", **SHAPE),
    "gemma3_untied": lambda: Gemma3TextConfig(tie_word_embeddings=False, sliding_window=8, **SHAPE),
    "phi3_tied": lambda: Phi3Config(tie_word_embeddings=True, pad_token_id=0, eos_token_id=2, **SHAPE),
}


def save_tiny(config, path: str) -> str:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    # Norm weights start at 1 (or 0 for Gemma's 1 + w): perturb them so that a norm whose
    # gradient were reduced over the wrong ranks would train differently from the reference.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_reference(request, tmp_path_factory):
    model_dir = save_tiny(FAMILIES[request.param](), str(tmp_path_factory.mktemp(request.param) / "model"))
    history, model = reference_training(model_dir, [make_batch(step) for step in range(STEPS)])
    return model_dir, history, model


@pytest.mark.slow
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2_sp"])
def test_family_under_tensor_parallelism_equals_one_process(family_reference, sequence_parallel, tmp_path):
    model_dir, history, model = family_reference
    layout = {"tensor_parallel_size": 2, "sequence_parallel": sequence_parallel}
    run_ranks(2, _train, model_dir, layout, str(tmp_path / "tp.pt"))
    _compare(torch.load(tmp_path / "tp.pt"), history, model)


@pytest.mark.slow
def test_tied_gemma3_under_tensor_parallelism_is_as_accurate_as_one_process(tmp_path):
    """Tied Gemma 3's TP 2 weights end up to 3.7e-5 (relative, per tensor; 1.3e-5 for the tied
    embedding) from the float32 single-process run, over the 1e-5 of the other families, and
    the cause is float32 rounding: the float32 single-process run is itself up to 2.4e-5 away
    from the same training in float64 (Adam's first steps divide by tiny second moments,
    amplifying the last bits of the gradients), and TP 2 is as close to float64 as it is. So
    per-step losses and gradient norms are held to 1e-5, and each final tensor to within twice
    the float32 reference's own distance from float64 (measured: at most 1.33x)."""
    config = Gemma3TextConfig(tie_word_embeddings=True, sliding_window=8, **SHAPE)
    model_dir = save_tiny(config, str(tmp_path / "model"))
    batches = [make_batch(step) for step in range(STEPS)]
    history, fp32 = reference_training(model_dir, batches)
    _, fp64 = reference_training(model_dir, batches, dtype=torch.float64)
    run_ranks(2, _train, model_dir, {"tensor_parallel_size": 2}, str(tmp_path / "tp.pt"))
    got = torch.load(tmp_path / "tp.pt")

    assert [s["loss"] for s in got["steps"]] == pytest.approx([h["loss"] for h in history], rel=1e-5)
    assert [s["grad_norm"] for s in got["steps"]] == pytest.approx([h["grad_norm"] for h in history], rel=1e-5)
    exact, single = fp64.state_dict(), fp32.state_dict()
    assert set(got["weights"]) == set(exact)
    for name, want in exact.items():
        tp_error = (got["weights"][name].double() - want).norm() / want.norm()
        fp32_error = (single[name].double() - want).norm() / want.norm()
        assert tp_error <= 2 * fp32_error + 1e-6, f"{name}: TP 2 {tp_error:.2e} vs float32 reference {fp32_error:.2e} from float64"
