"""The driver's handle on the model: one policy worker per reserved slot, of the enabled
backend (`DTensorPolicyWorker`, or `MegatronPolicyWorker` with policy.megatron_cfg.enabled).

The driver never holds weights. `Policy` splits each global batch contiguously over the
data-parallel ranks, sends each shard to every rank of that data-parallel rank's model-parallel
group (each worker says which data-parallel rank it is), calls every worker, and merges their
small metric dicts (one per data-parallel rank where they differ).
"""

from __future__ import annotations

from typing import Any

import torch

from nemo_rl.config.schema import PolicyConfig
from nemo_rl.data.batched_data_dict import BatchedDataDict
from nemo_rl.distributed.virtual_cluster import RayVirtualCluster
from nemo_rl.distributed.worker_group import RayWorkerGroup
from nemo_rl.models.policy.interfaces import LossFn
from nemo_rl.models.policy.micro_batching import MicroBatchPlan
from nemo_rl.models.policy.workers.dtensor_policy_worker import DTensorPolicyWorker


class Policy:
    """Args:
        cluster: the reserved slots; one data-parallel rank per slot, on GPUs if it has them.
        policy_cfg: the `policy` section.
        seed: the run's seed (workers add their rank where randomness must differ).
        weights_path / optimizer_path: a checkpoint's DCP directories to resume from.
    """

    def __init__(
        self,
        cluster: RayVirtualCluster,
        policy_cfg: PolicyConfig,
        *,
        seed: int,
        weights_path: str | None = None,
        optimizer_path: str | None = None,
    ):
        self.cfg = policy_cfg
        self.train_plan = MicroBatchPlan.for_training(policy_cfg)
        backend = policy_cfg.megatron_cfg if policy_cfg.megatron_cfg.enabled else policy_cfg.dtensor_cfg
        self.worker_group = RayWorkerGroup(
            cluster,
            _worker_class(policy_cfg),
            init_kwargs=dict(
                policy_cfg=policy_cfg,
                seed=seed,
                device="cuda" if cluster.use_gpus else "cpu",
                weights_path=weights_path,
                optimizer_path=optimizer_path,
            ),
            # Per-worker progress bars (weight loading, shard writing) interleave into noise
            # across ranks; the driver reports progress instead. The user's env_vars win.
            env_vars={"HF_HUB_DISABLE_PROGRESS_BARS": "1", **backend.env_vars},
            name_prefix="policy",
        )
        self.world_size = self.worker_group.world_size
        # The ranks of one model-parallel group hold the same rows.
        self.group_size = policy_cfg.parallel_layout().model_parallel_size()
        self.dp_size = self.world_size // self.group_size
        self.dp_rank_of_worker: list[int] = self.worker_group.run_all("data_parallel_rank")
        # One worker per data-parallel rank, for the metrics that differ between them.
        self.dp_representatives = [self.dp_rank_of_worker.index(d) for d in range(self.dp_size)]
        # {"trainable": ..., "total": ...}: parameter counts of the whole model (LoRA: adapter vs all).
        self.parameter_counts: dict[str, int] = self.worker_group.run_all("get_parameter_counts")[0]

    def train(self, batch: BatchedDataDict, loss_fn: LossFn) -> dict[str, Any]:
        """One optimizer step on the global `batch` with the algorithm's `loss_fn`, in the
        micro-batches the `policy` section configures."""
        shards = self._shards(batch)
        results = self.worker_group.run_sharded("train", shards, loss_fn=loss_fn, plan=self.train_plan)
        per_dp_rank = [results[i] for i in self.dp_representatives]
        # loss, grad_norm, lr and the global counts are already reduced: identical on all ranks.
        shared = ("loss", "grad_norm", "lr", "num_valid_tokens", "num_valid_samples", "num_tokens", "model_flops")
        metrics = {k: results[0][k] for k in shared}
        metrics["update_skipped"] = any(r["update_skipped"] for r in results)  # all agree
        metrics["peak_memory_gb"] = max(r["peak_memory_gb"] for r in results)
        metrics["peak_memory_gb_per_worker"] = [r["peak_memory_gb"] for r in results]
        peaks = [r["peak_flops"] for r in results]
        metrics["peak_flops"] = sum(peaks) if all(peaks) else None  # of all workers together
        metrics["local_valid_tokens_per_worker"] = [r["local_valid_tokens"] for r in per_dp_rank]
        return metrics

    def validate(self, batch: BatchedDataDict, loss_fn: LossFn, *, micro_batch_size: int) -> dict[str, float]:
        """`loss_fn`'s sum over `batch` (no update) and its number of target tokens, for the
        caller to add up over batches and divide once. `micro_batch_size` rows per micro-batch,
        or that many longest sequences' tokens under dynamic batching or packing."""
        shards = self._shards(batch)
        plan = MicroBatchPlan.for_validation(self.cfg, micro_batch_size)
        results = self.worker_group.run_sharded("validate", shards, loss_fn=loss_fn, plan=plan)
        results = [results[i] for i in self.dp_representatives]
        return {
            "loss_sum": sum(r["loss_sum"] for r in results),
            "num_valid_tokens": sum(r["num_valid_tokens"] for r in results),
        }

    def generate_greedy(self, prompts: list[list[int]], *, max_new_tokens: int) -> list[list[int]]:
        """The greedy continuation of each prompt (token ids): its new token ids, up to and
        including an end-of-sequence token. The prompts are split over the workers."""
        if not prompts:
            return []
        batch = BatchedDataDict(
            input_ids=torch.nn.utils.rnn.pad_sequence(
                [torch.tensor(p, dtype=torch.int64) for p in prompts], batch_first=True
            ),
            input_lengths=torch.tensor([len(p) for p in prompts], dtype=torch.int64),
        )
        shards = self._shards(batch)
        results = self.worker_group.run_sharded("generate_greedy", shards, max_new_tokens=max_new_tokens)
        results = [results[i] for i in self.dp_representatives]
        return [ids for rank_ids in results for ids in rank_ids][: len(prompts)]

    def _shards(self, batch: BatchedDataDict) -> list[BatchedDataDict]:
        """One shard per worker: data-parallel rank d's shard to every worker of rank d."""
        shards = batch.pad_batch_to_multiple(self.dp_size).shard_by_batch_size(self.dp_size)
        return [shards[d] for d in self.dp_rank_of_worker]

    def save_checkpoint(
        self,
        weights_path: str | None,
        optimizer_path: str | None = None,
        hf_path: str | None = None,
        hf_merged_path: str | None = None,
        hf_dtype: str | None = None,
    ) -> None:
        """Sharded DCP weights (and optimizer + scheduler) for resuming; `hf_path`: a complete
        Hugging Face model directory (written by all ranks from their shards) in `hf_dtype`
        (None: the training precision, float32 on CPU). The caller owns the directories.

        With LoRA, the weights are the adapter's only, `hf_path` is a PEFT adapter directory and
        `hf_merged_path` (optional) a full model with the adapter merged in."""
        self.worker_group.run_all(
            "save_checkpoint",
            weights_path=weights_path,
            optimizer_path=optimizer_path,
            hf_path=hf_path,
            hf_merged_path=hf_merged_path,
            hf_dtype=hf_dtype,
        )

    def shutdown(self) -> None:
        """Leaves the process groups, then kills the workers; idempotent."""
        try:
            self.worker_group.run_all("shutdown")
        except Exception:  # a failed or already shut-down group: killing it is all there is
            pass
        finally:
            self.worker_group.shutdown()


def _worker_class(policy_cfg: PolicyConfig) -> type:
    if policy_cfg.megatron_cfg.enabled:
        # Imported only when chosen: megatron-core is an optional extra.
        from nemo_rl.models.policy.workers.megatron_policy_worker import MegatronPolicyWorker

        return MegatronPolicyWorker
    return DTensorPolicyWorker
