"""What every policy worker counts around a training step, whatever its backend: the batch's
valid tokens, samples, tokens and model FLOPs summed over the data-parallel ranks, the metrics a
step returns, and the per-rank helpers behind them."""

from __future__ import annotations

import resource
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from nemo_rl.data.batched_data_dict import BatchedDataDict
from nemo_rl.data.targets import count_valid_tokens
from nemo_rl.utils.flops import training_flops


@dataclass(frozen=True)
class BatchCounts:
    """`totals` = [valid tokens, valid samples, tokens, model FLOPs] over the data-parallel ranks."""

    local_valid_tokens: torch.Tensor
    totals: torch.Tensor

    @property
    def global_valid_tokens(self) -> torch.Tensor:
        """The loss's normaliser: every valid target of the global batch."""
        return self.totals[0].to(torch.float32)


def count_batch(
    batch: BatchedDataDict,
    model_config: Any,
    *,
    device: torch.device,
    dp_group: dist.ProcessGroup | None,
    lora_params: int | None = None,
) -> BatchCounts:
    """One all-reduce over the data-parallel ranks (the ranks of a model-parallel group hold the
    same rows and would count them again)."""
    local_valid_tokens = count_valid_tokens(batch)
    local_valid_samples = (batch["sample_mask"] > 0).sum().to(torch.float64)
    lengths = batch["input_lengths"][batch["sample_mask"] > 0].tolist()  # the tokens of samples with loss
    flops = training_flops(model_config, lengths, num_targets=int(local_valid_tokens.item()), lora_params=lora_params)
    work = torch.tensor([sum(lengths), flops], dtype=torch.float64)
    totals = torch.cat([torch.stack([local_valid_tokens, local_valid_samples]), work]).to(device)
    dist.all_reduce(totals, group=dp_group)
    return BatchCounts(local_valid_tokens=local_valid_tokens, totals=totals)


def step_metrics(
    counts: BatchCounts,
    *,
    loss: float,
    grad_norm: float,
    lr: float,
    device: torch.device,
    peak_flops: float | None,
    update_skipped: bool,
) -> dict[str, Any]:
    """What `train` returns to the driver, the same keys on both backends."""
    return {
        "loss": loss,
        "grad_norm": grad_norm,
        "lr": lr,
        "num_valid_tokens": int(counts.totals[0].item()),
        "num_valid_samples": int(counts.totals[1].item()),
        "local_valid_tokens": int(counts.local_valid_tokens.item()),
        "peak_memory_gb": peak_memory_gb(device),
        "num_tokens": int(counts.totals[2].item()),
        "model_flops": counts.totals[3].item(),
        "peak_flops": peak_flops,
        "update_skipped": update_skipped,
    }


def peak_memory_gb(device: torch.device) -> float:
    """This step's peak allocated GPU memory, or this process's peak RSS on CPU (GiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # KiB on Linux


def max_over_ranks(n: int, device: torch.device) -> int:
    """The largest `n` over all ranks (ranks that must run the same number of forwards)."""
    count = torch.tensor([n], dtype=torch.int64, device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return int(count.item())
