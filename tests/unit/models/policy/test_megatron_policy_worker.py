"""MegatronPolicyWorker on a tiny Llama, run directly (no Ray) in gloo processes on the CPU.

Each layout trains 3 steps on the same batches and is compared with a plain single-process
PyTorch training of the HF model (the expected values come from that, not from Megatron):
same losses, gradient norms and learning rates to 1e-5. The reference follows Megatron's
weight-decay convention (none on 1-D parameters: the norm weights).
"""

from __future__ import annotations

import pytest
import torch
from tests.unit.distributed_helpers import run_ranks
from tests.unit.models.policy.policy_test_utils import (
    BASE_LR,
    EXPECTED_LRS,
    MAX_GRAD_NORM,
    make_batch,
    policy_config,
    reference_loss,
    save_tiny_llama,
)
from transformers import AutoModelForCausalLM, GenerationConfig

from nemo_rl.algorithms.loss_functions import NLLLoss
from nemo_rl.models.policy.micro_batching import MicroBatchPlan

pytest.importorskip("megatron.core")
# Slow: each test starts fresh processes that import megatron-core and build the model.
pytestmark = pytest.mark.slow

NUM_STEPS = 3
WEIGHT_DECAY = 0.01


def megatron_policy_config(model_dir: str, *, tp: int = 1, pp: int = 1, **megatron):
    return policy_config(
        model_dir,
        optimizer=None,
        scheduler=None,
        dtensor_cfg={"enabled": False},
        megatron_cfg={
            "enabled": True,
            "tensor_model_parallel_size": tp,
            "pipeline_model_parallel_size": pp,
            "optimizer": {
                "lr": BASE_LR,
                "min_lr": 0.0,
                "weight_decay": WEIGHT_DECAY,
                "clip_grad": MAX_GRAD_NORM,
                "use_distributed_optimizer": megatron.pop("use_distributed_optimizer", True),
            },
            # Linear warm-up from 0.5 x lr over 2 steps: EXPECTED_LRS.
            "scheduler": {"lr_warmup_iters": 2, "lr_warmup_init": 0.5 * BASE_LR},
            **megatron,
        },
    )


def reference_training(model_dir: str, batches) -> list[dict]:
    """Plain PyTorch AdamW on the HF model: decay on matrices only, clipping, the same lrs."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    params = list(model.parameters())
    groups = [
        {"params": [p for p in params if p.dim() > 1], "weight_decay": WEIGHT_DECAY},
        {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=BASE_LR)
    history = []
    for batch, lr in zip(batches, EXPECTED_LRS):
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = reference_loss(model, batch)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad()
        history.append({"loss": loss.item(), "grad_norm": grad_norm.item(), "lr": lr})
    history[0]["parameter_count"] = sum(p.numel() for p in params)  # the tied embedding once
    return history


def _train_layout(rank, model_dir, tp, pp, micro_batch_size, megatron, plan=None):
    from nemo_rl.models.policy.workers.megatron_policy_worker import MegatronPolicyWorker

    worker = MegatronPolicyWorker(megatron_policy_config(model_dir, tp=tp, pp=pp, **megatron), seed=1, device="cpu")
    dp_size = torch.distributed.get_world_size() // (tp * pp)
    history = []
    for seed in range(NUM_STEPS):
        local = make_batch(seed).shard_by_batch_size(dp_size)[worker.data_parallel_rank()]
        history.append(worker.train(local, NLLLoss(), plan or MicroBatchPlan(micro_batch_size)))
    history[0]["parameter_count"] = worker.get_parameter_counts()["total"]
    worker.shutdown()
    return history


def _check_against_reference(histories, reference):
    for history in histories:  # every rank reports the same global numbers
        for got, want in zip(history, reference, strict=True):
            assert got["update_skipped"] is False
            assert got["lr"] == pytest.approx(want["lr"], rel=1e-6)
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
            assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
            if "parameter_count" in got:
                assert got["parameter_count"] == want["parameter_count"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = save_tiny_llama(str(tmp_path_factory.mktemp("tiny_llama")))
    # Sampling settings of its own, which hf/ must carry over (not ones derived from config.json).
    generation = GenerationConfig.from_pretrained(path)
    generation.update(do_sample=True, temperature=0.7, top_p=0.9)
    generation.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference(model_dir):
    return reference_training(model_dir, [make_batch(seed) for seed in range(NUM_STEPS)])


def test_tp1_on_one_rank_matches_plain_pytorch(model_dir, reference):
    (history,) = run_ranks(1, _train_layout, model_dir, 1, 1, 2, {})
    _check_against_reference([history], reference)
    assert history[0]["num_valid_tokens"] == int(sum((make_batch(0)["token_mask"][:, 1:] * make_batch(0)["sample_mask"][:, None]).sum(0)))


@pytest.mark.parametrize(
    ("tp", "pp", "megatron"),
    [
        (1, 1, {"use_distributed_optimizer": False}),  # 2 data-parallel ranks, plain optimizer
        (2, 1, {}),
        (1, 2, {}),
    ],
    ids=["dp2", "tp2", "pp2"],
)
def test_two_rank_layouts_match_plain_pytorch(model_dir, reference, tp, pp, megatron):
    _check_against_reference(run_ranks(2, _train_layout, model_dir, tp, pp, 1, megatron), reference)


def test_tp2_pp2_on_four_ranks_matches_plain_pytorch(model_dir, reference):
    _check_against_reference(run_ranks(4, _train_layout, model_dir, 2, 2, 2, {}), reference)


def test_dynamic_batching_over_data_parallel_ranks_matches_plain_pytorch(model_dir, reference):
    """policy.dynamic_batching's micro-batches (rows sorted by length, padded to a multiple of 8,
    at most 32 tokens each), of different shapes on the two data-parallel ranks."""
    dynamic = MicroBatchPlan(1, length_multiple=8, token_budget=32)
    _check_against_reference(run_ranks(2, _train_layout, model_dir, 1, 1, 1, {}, dynamic), reference)


def test_sequence_packing_under_pipeline_parallelism_matches_plain_pytorch(model_dir, reference):
    """Packed rows of up to 32 tokens (several samples each, block-diagonal attention), of
    varying shapes through the pipeline stages."""
    packing = MicroBatchPlan(1, token_budget=32, packing_algorithm="first_fit_decreasing")
    _check_against_reference(run_ranks(2, _train_layout, model_dir, 1, 2, 1, {}, packing), reference)


# ---------------------------------------------------------------- checkpoints


def _allow_child_processes():
    """dist_checkpointing writes through a multiprocessing Manager (a child process), which a
    daemonic process may not start; run_ranks' processes are daemonic, Ray's workers are not."""
    import multiprocessing

    multiprocessing.current_process().daemon = False


def _adam_moments(worker) -> dict[str, dict[str, torch.Tensor]]:
    """{"exp_avg" | "exp_avg_sq": HF-named full tensors}, read back through the weight conversion
    (on the first rank; {} elsewhere). With one data-parallel rank, each rank's distributed
    optimizer holds the whole of its parameters' states."""
    from nemo_rl.models.megatron import hf_conversion

    inner = getattr(worker.optimizer, "chained_optimizers", [worker.optimizer])[0]
    params = [p for chunk in worker.bare_chunks for p in chunk.parameters()]
    weights = [p.data for p in params]
    moments = {}
    for key in ("exp_avg", "exp_avg_sq"):
        for p in params:
            p.data = inner._get_main_param_and_optimizer_states(p)[key].view(p.shape).clone()
        moments[key] = hf_conversion.megatron_to_hf_state_dict(worker.bare_chunks, worker.hf_config)
    for p, weight in zip(params, weights):
        p.data = weight
    return moments


def _save_then_step(rank, model_dir, out_dir):
    """TP 2: two steps, a checkpoint (weights, optimizer, hf/), the third and fourth steps."""
    from nemo_rl.models.policy.workers.megatron_policy_worker import MegatronPolicyWorker

    _allow_child_processes()
    worker = MegatronPolicyWorker(megatron_policy_config(model_dir, tp=2), seed=1, device="cpu")
    history = [worker.train(make_batch(seed), NLLLoss(), MicroBatchPlan(2)) for seed in range(2)]
    worker.save_checkpoint(
        weights_path=f"{out_dir}/weights", optimizer_path=f"{out_dir}/optimizer", hf_path=f"{out_dir}/hf"
    )
    worker.save_checkpoint(weights_path=None, hf_path=f"{out_dir}/hf_bf16", hf_dtype="bfloat16")
    moments = _adam_moments(worker)
    history += [worker.train(make_batch(seed), NLLLoss(), MicroBatchPlan(2)) for seed in (2, 3)]
    worker.shutdown()
    return history, moments


def _resume_and_step(rank, model_dir, out_dir, tp):
    """Resumed from the checkpoint at TP `tp`: its Adam moments, then the third and fourth steps."""
    from nemo_rl.models.policy.workers.megatron_policy_worker import MegatronPolicyWorker

    _allow_child_processes()
    worker = MegatronPolicyWorker(
        megatron_policy_config(model_dir, tp=tp),
        seed=1,
        device="cpu",
        weights_path=f"{out_dir}/weights",
        optimizer_path=f"{out_dir}/optimizer",
    )
    moments = _adam_moments(worker)
    history = [worker.train(make_batch(seed), NLLLoss(), MicroBatchPlan(2)) for seed in (2, 3)]
    worker.shutdown()
    return history, moments


def test_checkpoint_resumes_bit_exact_reshards_to_tp1_and_exports_hf(model_dir, reference, tmp_path):
    out_dir = str(tmp_path)
    uninterrupted = run_ranks(2, _save_then_step, model_dir, out_dir)
    _check_against_reference([history[:NUM_STEPS] for history, _ in uninterrupted], reference)
    after_save, saved_moments = uninterrupted[0][0][2:], uninterrupted[0][1]
    step3 = after_save[0]

    # Same layout: the third and fourth steps (the fourth moves the weights with the restored
    # Adam moments) are bit-identical.
    for resumed, _ in run_ranks(2, _resume_and_step, model_dir, out_dir, 2):
        for got, want in zip(resumed, after_save, strict=True):
            assert (got["loss"], got["grad_norm"], got["lr"]) == (want["loss"], want["grad_norm"], want["lr"])
    # TP 2 -> TP 1: weights and Adam moments resharded into one rank's layout; the run goes on
    # as the uninterrupted one.
    ((resumed, moments),) = run_ranks(1, _resume_and_step, model_dir, out_dir, 1)
    for got, want in zip(resumed, after_save, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
        assert got["lr"] == want["lr"]
    for key in ("exp_avg", "exp_avg_sq"):
        assert moments[key].keys() == saved_moments[key].keys()
        for name, tensor in moments[key].items():
            assert torch.equal(tensor, saved_moments[key][name]), f"{key} {name}"

    # hf/ holds the weights after step 2: the HF model's loss on batch 2 is step 3's loss.
    hf_model = AutoModelForCausalLM.from_pretrained(f"{out_dir}/hf", dtype=torch.float32)
    with torch.no_grad():
        assert reference_loss(hf_model, make_batch(2)).item() == pytest.approx(step3["loss"], rel=1e-5)

    # generation_config.json: the model's own, as the DTensor backend writes it.
    assert GenerationConfig.from_pretrained(f"{out_dir}/hf").to_dict() == GenerationConfig.from_pretrained(model_dir).to_dict()

    # checkpointing.hf_dtype: the same weights, written in bfloat16.
    from safetensors.torch import load_file

    bf16 = load_file(f"{out_dir}/hf_bf16/model.safetensors")
    fp32 = load_file(f"{out_dir}/hf/model.safetensors")
    assert bf16.keys() == fp32.keys()
    for name, tensor in bf16.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, fp32[name].to(torch.bfloat16)), name
