"""HF -> Megatron -> HF: the Megatron model loaded from an HF checkpoint gives the HF model's
logits (fp32, 1e-5) at TP 1, TP 2, PP 2 and TP 2 x PP 2, and the HF directory written back from
it holds the original tensors and loads with `from_pretrained`."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from nemo_rl.models.megatron.hf_conversion import hf_module_name, hf_module_names, megatron_module_name
from tests.unit.distributed_helpers import run_ranks
from tests.unit.models.megatron.megatron_test_utils import (
    TINY_CONFIGS,
    logits_and_round_trip_scenario,
    make_tiny_hf_model,
    sample_input_ids,
)

# (tp, pp) on 4 ranks: data parallelism fills the rest (TP 1: 4 replicas; TP 2: 2; TP 2 x PP 2: 1).
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]


def test_module_names_map_both_ways():
    assert hf_module_names("decoder.layers.3.self_attention.linear_qkv") == [
        "model.layers.3.self_attn.q_proj",
        "model.layers.3.self_attn.k_proj",
        "model.layers.3.self_attn.v_proj",
    ]
    assert hf_module_names("decoder.layers.0.mlp.linear_fc1") == ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]
    assert hf_module_name("decoder.layers.1.mlp.linear_fc2") == "model.layers.1.mlp.down_proj"
    assert hf_module_name("output_layer") == "lm_head"
    for hf_name in ("model.layers.5.self_attn.k_proj", "model.layers.5.self_attn.o_proj", "model.layers.5.mlp.up_proj", "model.embed_tokens"):
        assert hf_name in hf_module_names(megatron_module_name(hf_name))
    with pytest.raises(KeyError, match="fuses"):
        hf_module_name("decoder.layers.0.self_attention.linear_qkv")
    with pytest.raises(KeyError, match="vision_tower"):
        megatron_module_name("model.vision_tower.proj")


@pytest.mark.slow
def test_megatron_logits_and_round_trip_match_hf_across_layouts(tmp_path):
    pytest.importorskip("megatron.core", reason="megatron-core is the optional `megatron` extra (uv sync --extra megatron)")
    hf_models, hf_dirs = {}, {}
    for name in TINY_CONFIGS:
        hf_dirs[name] = str(tmp_path / "hf" / name)
        hf_models[name] = make_tiny_hf_model(name, tmp_path / "hf" / name)

    per_rank = run_ranks(4, logits_and_round_trip_scenario, LAYOUTS, hf_dirs, str(tmp_path / "back"), timeout_s=900)

    checked = set()
    for results in per_rank:
        for (name, tp, pp), logits in results.items():
            model = hf_models[name]
            with torch.no_grad():
                expected = model(sample_input_ids(model.config.vocab_size)).logits
            torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name} at TP {tp} PP {pp}: {m}")
            checked.add((name, tp, pp))
    assert checked == {(name, tp, pp) for name in TINY_CONFIGS for tp, pp in LAYOUTS}

    for tp, pp in LAYOUTS:
        for name, model in hf_models.items():
            back = AutoModelForCausalLM.from_pretrained(tmp_path / "back" / f"tp{tp}pp{pp}" / name, dtype=torch.float32, attn_implementation="eager")
            original, written = model.state_dict(), back.state_dict()
            assert written.keys() == original.keys(), f"{name} TP {tp} PP {pp}"
            for key, tensor in original.items():
                assert torch.equal(written[key], tensor), f"{name} TP {tp} PP {pp}: {key} differs after the round trip"
            assert back.config.tie_word_embeddings == model.config.tie_word_embeddings
