"""Tiny models, batches and configs for the policy tests, plus a plain-PyTorch reference.

Imported by the test modules of this directory (and by the processes they start with
`tests.unit.distributed_helpers.run_ranks`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from nemo_rl.config.schema import PolicyConfig
from nemo_rl.data.batched_data_dict import BatchedDataDict

VOCAB = 128
SEQ_LEN = 16
GLOBAL_BATCH = 8
BASE_LR = 1e-2
MAX_GRAD_NORM = 0.1  # small enough that every step of the tests clips
# LinearLR warm-up over 2 steps from 0.5x, then constant: the lr of steps 1, 2, 3.
EXPECTED_LRS = [0.5 * BASE_LR, 0.75 * BASE_LR, BASE_LR]


def tiny_llama(*, tie_word_embeddings: bool = True) -> LlamaForCausalLM:
    """The policy tests' model: 2 layers, hidden 32, GQA 4/2 heads, seeded weights."""
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def save_tiny_llama(path: str, *, tie_word_embeddings: bool = True) -> str:
    tiny_llama(tie_word_embeddings=tie_word_embeddings).save_pretrained(path)
    return path


def make_batch(seed: int, batch_size: int = GLOBAL_BATCH, seq_len: int = SEQ_LEN) -> BatchedDataDict:
    """Right-padded rows of varied length; a masked prompt, then target tokens; row 5 has
    sample_mask 0."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, seq_len + 1, (batch_size,), generator=g)
    lengths[0] = seq_len  # at least one full-length row
    input_ids = torch.randint(1, VOCAB, (batch_size, seq_len), generator=g)
    token_mask = torch.zeros(batch_size, seq_len)
    for b, length in enumerate(lengths.tolist()):
        input_ids[b, length:] = 0
        prompt = int(torch.randint(1, length - 1, (1,), generator=g))
        token_mask[b, prompt:length] = 1.0
    sample_mask = torch.ones(batch_size)
    sample_mask[5 % batch_size] = 0.0
    return BatchedDataDict(
        input_ids=input_ids, input_lengths=lengths, token_mask=token_mask, sample_mask=sample_mask
    )


def policy_config(model_dir: str, **overrides) -> PolicyConfig:
    fields = dict(
        model_name=model_dir,
        tokenizer={"name": model_dir},
        train_global_batch_size=GLOBAL_BATCH,
        train_micro_batch_size=1,
        max_total_sequence_length=SEQ_LEN,
        precision="float32",
        max_grad_norm=MAX_GRAD_NORM,
        optimizer={"name": "torch.optim.AdamW", "kwargs": {"lr": BASE_LR, "weight_decay": 0.01}},
        scheduler=[
            {
                "name": "torch.optim.lr_scheduler.LinearLR",
                "kwargs": {"start_factor": 0.5, "end_factor": 1.0, "total_iters": 2},
            },
            {"name": "torch.optim.lr_scheduler.ConstantLR", "kwargs": {"factor": 1.0, "total_iters": 1}},
            {"milestones": [2]},
        ],
    )
    fields.update(overrides)
    return PolicyConfig(**fields)


def train_step(worker, step: int) -> dict:
    """The worker's data-parallel share of batch `step`, trained in micro-batches of 2."""
    from nemo_rl.algorithms.loss_functions import NLLLoss
    from nemo_rl.models.policy.micro_batching import MicroBatchPlan

    local = make_batch(step).shard_by_batch_size(worker.dp_size)[worker.dp_rank]
    return worker.train(local, NLLLoss(), MicroBatchPlan(2))


def resume_and_step(model_dir: str, out_dir: str, **config_overrides) -> dict:
    """A worker resumed from `out_dir`'s weights/ and optim/ trains step 1; its result, and the
    logits of a fixed batch (a collective: every rank calls it)."""
    import os

    from nemo_rl.models.policy.workers.dtensor_policy_worker import DTensorPolicyWorker

    worker = DTensorPolicyWorker(
        policy_config(model_dir, **config_overrides),
        seed=1,
        device="cpu",
        weights_path=os.path.join(out_dir, "weights"),
        optimizer_path=os.path.join(out_dir, "optim"),
    )
    result = train_step(worker, 1)
    logits = worker.get_logits(make_batch(9))
    worker.shutdown()
    return {"step": result, "logits": logits, "plain": not worker.fully_sharded}


# ---------------------------------------------------------------- independent reference


def reference_loss(model: torch.nn.Module, batch: BatchedDataDict) -> torch.Tensor:
    """Mean cross-entropy over the target tokens of the batch: HF forward on the whole padded
    batch, labels = next tokens with -100 where no loss is due."""
    logits = model(input_ids=batch["input_ids"]).logits
    labels = batch["input_ids"].clone()
    no_loss = (batch["token_mask"] == 0) | (batch["sample_mask"][:, None] == 0)
    labels[no_loss] = -100
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).to(torch.promote_types(logits.dtype, torch.float32)),
        labels[:, 1:].reshape(-1),
        ignore_index=-100,
    )


def reference_training(
    model_dir: str, batches: list[BatchedDataDict], dtype: torch.dtype = torch.float32
) -> tuple[list[dict], torch.nn.Module]:
    """Single-process training with the same optimizer, clipping and lr sequence (in float64,
    a yardstick for how far float32 rounding alone moves a run)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=BASE_LR, weight_decay=0.01)
    history = []
    for batch, lr in zip(batches, EXPECTED_LRS):
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = reference_loss(model, batch)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad()
        history.append({"loss": loss.item(), "grad_norm": grad_norm.item(), "lr": lr})
    return history, model
