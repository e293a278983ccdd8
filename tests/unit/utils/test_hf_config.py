"""policy.hf_config_overrides: set on the HF config before the model is built; a key the config
does not have is refused, naming it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from nemo_rl.config.schema import PolicyConfig
from nemo_rl.models.policy.workers.dtensor_policy_worker import _config_override_kwargs
from nemo_rl.utils.hf_config import load_hf_config
from nemo_rl.utils.preflight import count_parameters

TINY = str(Path(__file__).resolve().parents[3] / "assets" / "tiny-llama")


def _policy(**overrides) -> PolicyConfig:
    return PolicyConfig(
        model_name=TINY, tokenizer={"name": TINY}, train_global_batch_size=2, train_micro_batch_size=1,
        max_total_sequence_length=32, hf_config_overrides=overrides,
    )


def test_overrides_reach_the_built_model():
    plain = load_hf_config(TINY)
    assert plain.rms_norm_eps != 1e-3 and plain.num_hidden_layers > 1
    policy = _policy(rms_norm_eps=1e-3, num_hidden_layers=1)
    model = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32, **_config_override_kwargs(policy))
    assert len(model.model.layers) == 1
    assert model.model.norm.variance_epsilon == 1e-3
    assert count_parameters(TINY, config_overrides={"num_hidden_layers": 1}) == sum(p.numel() for p in model.parameters())


def test_no_overrides_leave_from_pretrained_untouched():
    assert _config_override_kwargs(_policy()) == {}


def test_a_key_the_config_lacks_is_refused_by_name():
    with pytest.raises(ValueError, match=r"policy.hf_config_overrides.rope_thetaa: LlamaConfig has no attribute 'rope_thetaa'"):
        load_hf_config(TINY, overrides={"rope_thetaa": 1.0})
