"""Training features under tensor parallelism (TP 2, 2 gloo ranks) train exactly like the
single-process reference (per-step losses, gradient norms, final weights; fp32, rel 1e-5):
activation checkpointing and CPU offload together with sequence packing, and dynamic batching.
Each rank splits its rows by the policy's own micro-batch plan (token budgets here)."""

from __future__ import annotations

import pytest
import torch
from tests.unit.distributed_helpers import run_ranks
from tests.unit.models.policy.policy_test_utils import make_batch, policy_config, reference_training, save_tiny_llama
from tests.unit.models.policy.test_parallel_layouts import STEPS, _compare
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from nemo_rl.algorithms.loss_functions import NLLLoss
from nemo_rl.models.policy.micro_batching import MicroBatchPlan
from nemo_rl.models.policy.workers.dtensor_policy_worker import DTensorPolicyWorker

TP2 = {"tensor_parallel_size": 2}
FEATURES = {
    "checkpointing_offload_packing": dict(
        dtensor_cfg={**TP2, "activation_checkpointing": True, "cpu_offload": True},
        sequence_packing={"enabled": True, "train_mb_tokens": 32},
    ),
    "dynamic_batching": dict(
        dtensor_cfg={**TP2, "sequence_parallel": True},
        dynamic_batching={"enabled": True, "train_mb_tokens": 32, "sequence_length_round": 4},
    ),
}


def _train_with(rank, model_dir, overrides, out_path):
    cfg = policy_config(model_dir, **overrides)
    worker = DTensorPolicyWorker(cfg, seed=1, device="cpu")
    plan = MicroBatchPlan.for_training(cfg)
    assert plan.token_budget == 32
    steps = [worker.train(make_batch(step), NLLLoss(), plan) for step in range(STEPS)]
    weights = get_model_state_dict(worker.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save({"steps": steps, "weights": weights}, out_path)
    worker.shutdown()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    model_dir = save_tiny_llama(str(tmp_path_factory.mktemp("features") / "model"), tie_word_embeddings=False)
    history, model = reference_training(model_dir, [make_batch(step) for step in range(STEPS)])
    return model_dir, history, model


@pytest.mark.slow
@pytest.mark.parametrize("feature", list(FEATURES))
def test_feature_under_tensor_parallelism_equals_one_process(feature, reference, tmp_path):
    model_dir, history, model = reference
    run_ranks(2, _train_with, model_dir, FEATURES[feature], str(tmp_path / "tp.pt"))
    _compare(torch.load(tmp_path / "tp.pt"), history, model)
