"""Which form of the distributed optimizer's checkpoint a resume reads, and when it refuses.
(Resharding the states themselves: test_megatron_policy_worker.py, TP 2 -> TP 1.)"""

from __future__ import annotations

import json

import pytest

from nemo_rl.models.megatron import optimizer_checkpoint

TP2 = {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 1}
TP1 = {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1}


def test_a_checkpoint_written_now_loads_into_another_layout(tmp_path):
    optimizer_checkpoint.write_layout(str(tmp_path), TP2)
    assert optimizer_checkpoint.form_to_read(str(tmp_path), TP1) == "fully_reshardable"
    assert optimizer_checkpoint.sharding_metadata("fully_reshardable") == {"distrib_optim_sharding_type": "fully_reshardable"}


def test_an_earlier_checkpoint_loads_into_its_own_layout_only(tmp_path):
    (tmp_path / optimizer_checkpoint.LAYOUT_FILE).write_text(json.dumps(TP2))  # no form recorded
    assert optimizer_checkpoint.form_to_read(str(tmp_path), TP2) == "dp_reshardable"
    with pytest.raises(ValueError, match=r"saved with .*'tensor_model_parallel_size': 2.*'dp_reshardable'.*this run has"):
        optimizer_checkpoint.form_to_read(str(tmp_path), TP1)


def test_a_checkpoint_without_layout_file_is_read_in_the_earlier_form(tmp_path):
    assert optimizer_checkpoint.form_to_read(str(tmp_path), TP1) == "dp_reshardable"
