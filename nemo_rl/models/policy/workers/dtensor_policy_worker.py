"""One data-parallel rank of a Hugging Face causal LM trained with FSDP2 (DTensor).

A plain class: `RayWorkerGroup` wraps it with `ray.remote`, and tests may construct it
directly in processes that have RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set. All
ranks call each method together (every method runs collectives).

Shape legend: B batch, T time (tokens), V vocabulary.

What one `train` call does, for this rank's shard of the global batch:
  1. all-reduce the count of valid target tokens (and samples) over the data-parallel ranks;
  2. per micro-batch: forward, loss = masked NLL sum / global valid tokens, backward;
     FSDP reduce-scatters each micro-batch's gradients with a SUM over ranks (see
     `parallelize.apply_fsdp`), so the accumulated gradient is that of the global-mean loss;
  3. global gradient norm (over all shards), clip at `max_grad_norm`, optimizer and
     scheduler step, zero the gradients.
"""

from __future__ import annotations

import os
import resource
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

from nemo_rl.algorithms.loss_functions import NLLLoss, count_valid_tokens
from nemo_rl.config.schema import PolicyConfig
from nemo_rl.data.batched_data_dict import BatchedDataDict
from nemo_rl.distributed.worker_env import init_torch_distributed
from nemo_rl.models.parallelize import PRECISIONS, apply_activation_checkpointing, apply_fsdp
from nemo_rl.models.policy.hf_export import save_hf_checkpoint, shared_parameter_aliases
from nemo_rl.models.policy.optim import build_optimizer, build_scheduler

LossFn = Callable[[torch.Tensor, BatchedDataDict, torch.Tensor], tuple[torch.Tensor, dict[str, Any]]]

SCHEDULER_FILE = "scheduler.pt"  # in optimizer_path, written by rank 0
RNG_FILE = "rng_rank{rank}.pt"  # in optimizer_path, one per rank (dropout streams)


class DTensorPolicyWorker:
    def __init__(
        self,
        policy_cfg: PolicyConfig,
        *,
        seed: int,
        device: str,
        weights_path: str | None = None,
        optimizer_path: str | None = None,
    ):
        self.cfg = policy_cfg
        self.rank, self.world_size, self.device = init_torch_distributed(device)

        # Every rank builds the same model: same seed for anything the checkpoint lacks.
        torch.manual_seed(seed)
        # The fp32 master copy; `policy.precision` only sets the compute dtype (below).
        model = AutoModelForCausalLM.from_pretrained(
            policy_cfg.model_name,
            trust_remote_code=policy_cfg.trust_remote_code,
            dtype=torch.float32,
        )
        self.tied_keys = shared_parameter_aliases(model)
        mesh = init_device_mesh(self.device.type, (self.world_size,), mesh_dim_names=("dp",))
        if policy_cfg.dtensor_cfg.activation_checkpointing:
            apply_activation_checkpointing(model)
        apply_fsdp(
            model,
            mesh,
            param_dtype=PRECISIONS[policy_cfg.precision],
            reduce_dtype=torch.float32,
            cpu_offload=policy_cfg.dtensor_cfg.cpu_offload,
        )
        self.model = model
        self.optimizer = build_optimizer(model.parameters(), policy_cfg.optimizer)
        self.scheduler = build_scheduler(self.optimizer, *policy_cfg.scheduler_entries())
        self.loss_fn: LossFn = NLLLoss()

        # Randomness that should differ per rank (dropout) from here on.
        torch.manual_seed(seed + self.rank)
        if weights_path is not None:
            self._load_weights(weights_path)
        if optimizer_path is not None:
            self._load_optimizer(optimizer_path)

    # ------------------------------------------------------------------ train / eval

    def train(
        self,
        batch: BatchedDataDict,
        *,
        micro_batch_size: int,
        loss_fn: LossFn | None = None,
    ) -> dict[str, Any]:
        """One optimizer step on this rank's shard of the global batch."""
        loss_fn = loss_fn or self.loss_fn
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.model.train()

        local_valid_tokens = count_valid_tokens(batch)
        local_valid_samples = (batch["sample_mask"] > 0).sum().to(torch.float64)
        counts = torch.stack([local_valid_tokens, local_valid_samples]).to(self.device)
        dist.all_reduce(counts)
        global_valid_tokens = counts[0].to(torch.float32)

        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for mb in batch.micro_batches(micro_batch_size):
            mb = _trim_right_padding(mb, self.cfg.make_sequence_length_divisible_by).to(self.device)
            logits_BTV = self._forward(mb)
            loss, _ = loss_fn(logits_BTV, mb, global_valid_tokens)
            loss.backward()
            loss_sum += loss.detach()
            del logits_BTV, loss  # free this micro-batch's logits before the next forward
        dist.all_reduce(loss_sum)

        grad_norm = self._clip_grad_norm()
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {
            "loss": loss_sum.item(),
            "grad_norm": grad_norm,
            "lr": lr,
            "num_valid_tokens": int(counts[0].item()),
            "num_valid_samples": int(counts[1].item()),
            "local_valid_tokens": int(local_valid_tokens.item()),
            "peak_memory_gb": self._peak_memory_gb(),
        }

    @torch.no_grad()
    def validate(self, batch: BatchedDataDict, *, micro_batch_size: int) -> dict[str, float]:
        """This rank's masked NLL sum and valid-token count; the driver token-weights them."""
        self.model.eval()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        num_valid_tokens = 0.0
        for mb in batch.micro_batches(micro_batch_size):
            mb = _trim_right_padding(mb, self.cfg.make_sequence_length_divisible_by).to(self.device)
            _, metrics = self.loss_fn(self._forward(mb), mb, torch.ones((), device=self.device))
            loss_sum += metrics["nll_sum"]
            num_valid_tokens += metrics["num_valid_tokens"].item()
        return {"loss_sum": loss_sum.item(), "num_valid_tokens": num_valid_tokens}

    @torch.no_grad()
    def get_logits(self, batch: BatchedDataDict) -> torch.Tensor:
        """logits_BTV (fp32, CPU) for this rank's `batch`, padding positions included."""
        self.model.eval()
        return self._forward(batch.to(self.device)).float().cpu()

    def _forward(self, mb: BatchedDataDict) -> torch.Tensor:
        # Padding is on the right, so the causal mask alone keeps every valid token from
        # seeing it: no attention mask needed, and default position ids are right.
        return self.model(input_ids=mb["input_ids"], use_cache=False).logits

    def _clip_grad_norm(self) -> float:
        """The norm of the whole gradient (all shards), clipped to `max_grad_norm` if set."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        total_norm = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0)
        if isinstance(total_norm, DTensor):
            # The per-shard norms are a Partial placement; full_tensor() reduces them.
            total_norm = total_norm.full_tensor()
        if self.cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(params, self.cfg.max_grad_norm, total_norm)
        return total_norm.item()

    def _peak_memory_gb(self) -> float:
        """This step's peak allocated GPU memory, or this process's peak RSS on CPU (GiB)."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # KiB on Linux

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(
        self,
        *,
        weights_path: str | None,
        optimizer_path: str | None = None,
        hf_path: str | None = None,
    ) -> None:
        """Writes into the given directories (each rank its shard); the driver renames."""
        if weights_path is not None:
            dcp.save(get_model_state_dict(self.model), checkpoint_id=weights_path)
        if optimizer_path is not None:
            dcp.save(get_optimizer_state_dict(self.model, self.optimizer), checkpoint_id=optimizer_path)
            if self.rank == 0:
                torch.save(self.scheduler.state_dict(), os.path.join(optimizer_path, SCHEDULER_FILE))
            torch.save(_rng_state(self.device), os.path.join(optimizer_path, RNG_FILE.format(rank=self.rank)))
        if hf_path is not None:
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            full_state_dict = get_model_state_dict(self.model, options=options)
            if self.rank == 0:
                save_hf_checkpoint(
                    full_state_dict,
                    hf_path,
                    config=self.model.config,
                    generation_config=self.model.generation_config,
                    trust_remote_code=self.cfg.trust_remote_code,
                    tied_keys=self.tied_keys,
                )
            del full_state_dict
        dist.barrier()

    def _load_weights(self, weights_path: str) -> None:
        state_dict = get_model_state_dict(self.model)
        dcp.load(state_dict, checkpoint_id=weights_path)
        set_model_state_dict(self.model, state_dict)

    def _load_optimizer(self, optimizer_path: str) -> None:
        state_dict = get_optimizer_state_dict(self.model, self.optimizer)
        dcp.load(state_dict, checkpoint_id=optimizer_path)
        set_optimizer_state_dict(self.model, self.optimizer, state_dict)
        self.scheduler.load_state_dict(torch.load(os.path.join(optimizer_path, SCHEDULER_FILE)))
        rng_file = os.path.join(optimizer_path, RNG_FILE.format(rank=self.rank))
        if os.path.exists(rng_file):  # absent when resuming at a larger world size
            _set_rng_state(torch.load(rng_file), self.device)

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _trim_right_padding(mb: BatchedDataDict, multiple: int) -> BatchedDataDict:
    """Drops the time steps past the micro-batch's longest sequence (all right padding),
    keeping the length a multiple of `multiple`. Exact: causal attention never looks right."""
    width = mb["input_ids"].shape[1]
    longest = int(mb["input_lengths"].max().item()) if len(mb["input_lengths"]) else width
    keep = min(width, max(2, -(-longest // multiple) * multiple))
    if keep == width:
        return mb
    return BatchedDataDict(
        {k: v[:, :keep] if isinstance(v, torch.Tensor) and v.dim() >= 2 else v for k, v in mb.items()}
    )
