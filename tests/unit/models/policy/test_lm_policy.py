"""Policy over a RayWorkerGroup of 2 CPU workers: train steps, validation, checkpoint."""

from __future__ import annotations

import pytest
import torch
from tests.unit.models.policy.policy_test_utils import (
    make_batch,
    policy_config,
    reference_loss,
    reference_training,
    save_tiny_llama,
)
from transformers import AutoModelForCausalLM

from nemo_rl.algorithms.loss_functions import NLLLoss
from nemo_rl.distributed import RayVirtualCluster
from nemo_rl.models.policy import Policy

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def policy(tmp_path_factory, local_ray):
    model_dir = save_tiny_llama(str(tmp_path_factory.mktemp("lm_policy") / "tiny_llama"))
    cfg = policy_config(model_dir, train_micro_batch_size=2)
    cluster = RayVirtualCluster(1, 2, use_gpus=False, placement_timeout_s=60)
    policy = Policy(cluster, cfg, seed=7)
    yield policy, model_dir
    policy.shutdown()
    cluster.shutdown()


def test_train_validate_and_save(policy, tmp_path):
    policy, model_dir = policy
    batches = [make_batch(seed) for seed in range(2)]
    want, reference_model = reference_training(model_dir, batches)

    for step, (batch, expected) in enumerate(zip(batches, want)):
        metrics = policy.train(batch, NLLLoss())
        assert metrics["loss"] == pytest.approx(expected["loss"], rel=1e-5), f"step {step + 1}"
        assert metrics["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-5)
        assert metrics["lr"] == pytest.approx(expected["lr"])
        assert metrics["num_valid_samples"] == 7
        assert len(metrics["peak_memory_gb_per_worker"]) == 2
        assert sum(metrics["local_valid_tokens_per_worker"]) == metrics["num_valid_tokens"]

    # 7 rows: padded to 8 with a sample_mask-0 row, which carries no loss; micro-batch 3
    # does not divide the local batch of 4, so the last micro-batch is short
    val_batch = make_batch(10).slice(0, 7)
    result = policy.validate(val_batch, NLLLoss(), micro_batch_size=3)
    reference_model.eval()
    with torch.no_grad():
        expected_val = reference_loss(reference_model, val_batch).item()
    assert result["loss_sum"] / result["num_valid_tokens"] == pytest.approx(expected_val, rel=1e-5)
    want_tokens = (val_batch["token_mask"][:, 1:] * val_batch["sample_mask"][:, None]).sum()
    assert result["num_valid_tokens"] == want_tokens

    policy.save_checkpoint(
        weights_path=str(tmp_path / "weights"),
        optimizer_path=str(tmp_path / "optim"),
        hf_path=str(tmp_path / "hf"),
    )
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    for key, value in saved.state_dict().items():
        torch.testing.assert_close(value, reference_model.state_dict()[key], rtol=1e-5, atol=1e-5)
    assert (tmp_path / "weights" / ".metadata").exists() and (tmp_path / "optim" / "scheduler.pt").exists()


def test_generate_greedy_splits_the_prompts_over_the_workers(policy, tmp_path):
    policy, _ = policy
    prompts = [[5, 9, 17, 3], [40, 8, 3, 99, 7, 61], [11]]  # 3 prompts, 2 workers: one padding row
    got = policy.generate_greedy(prompts, max_new_tokens=6)

    policy.save_checkpoint(weights_path=None, hf_path=str(tmp_path / "hf"))  # the weights as they are now
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    want = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6)
        want.append(out[0, len(prompt) :].tolist())
    assert got == want
    assert policy.generate_greedy([], max_new_tokens=6) == []
