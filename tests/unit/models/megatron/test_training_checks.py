"""The driver's checks of a Megatron run, before any worker starts."""

from __future__ import annotations

import pytest
from tests.unit.models.policy.policy_test_utils import save_tiny_llama
from tests.unit.models.policy.test_megatron_policy_worker import megatron_policy_config

from nemo_rl.models.megatron.training_checks import check_megatron_policy

pytest.importorskip("megatron.core")


def test_a_layout_the_model_divides_passes_and_one_it_does_not_is_refused_naming_it(tmp_path):
    model_dir = save_tiny_llama(str(tmp_path))  # 4 heads, 2 KV heads, 2 layers
    check_megatron_policy(megatron_policy_config(model_dir, tp=2, pp=2))
    with pytest.raises(ValueError, match=r"policy.megatron_cfg with policy.model_name=.*tensor_model_parallel_size=4"):
        check_megatron_policy(megatron_policy_config(model_dir, tp=4))
    with pytest.raises(ValueError, match=r"policy.megatron_cfg with policy.model_name=.*pipeline_model_parallel_size"):
        check_megatron_policy(megatron_policy_config(model_dir, pp=4))
