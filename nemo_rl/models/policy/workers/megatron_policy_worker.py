"""One rank of a Hugging Face causal LM trained with megatron-core (`policy.megatron_cfg`).

The same calls as `DTensorPolicyWorker` (train, validate, save_checkpoint, get_parameter_counts,
shutdown), so `Policy` drives either. A plain class: `RayWorkerGroup` wraps it with
`ray.remote`; tests construct it directly in processes with RANK / WORLD_SIZE / MASTER_ADDR /
MASTER_PORT set. All ranks call each method together.

Layout (megatron-core's default rank order tp-cp-dp-pp): tensor-parallel ranks are consecutive,
then data-parallel replicas, then pipeline stages. `data_parallel_rank()` tells `Policy` which
shard of each global batch this rank gets; the ranks of one tensor x pipeline group get the same.

What one `train(batch, loss_fn, plan)` does, for this rank's shard of the global batch:
  1. all-reduce the count of valid target tokens over the data-parallel ranks;
  2. the micro-batches of `plan` through Megatron's pipeline schedule
     (models/megatron/training_step.py): forward, the algorithm's `loss_fn` on the last stage
     (its sum divided by the global valid tokens, as on the DTensor backend), backward;
     Megatron's DDP sums the gradients over the data-parallel ranks;
  3. global gradient norm, clip at megatron_cfg.optimizer.clip_grad, optimizer and scheduler
     step. A non-finite loss or gradient norm skips the update on every rank.

Checkpoints: megatron-core's `dist_checkpointing` (each rank writes its shards; a checkpoint
loads into another tensor/pipeline layout), and `hf/`, a Hugging Face model directory converted
from the Megatron weights (models/megatron/hf_conversion.py) at every save.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import torch
import torch.distributed as dist

from nemo_rl.config.schema import PolicyConfig
from nemo_rl.data.batched_data_dict import BatchedDataDict
from nemo_rl.distributed.worker_env import init_torch_distributed
from nemo_rl.models.parallelize import hf_export_dtype
from nemo_rl.models.policy.interfaces import LossFn
from nemo_rl.models.policy.micro_batching import MicroBatchPlan, micro_batches
from nemo_rl.models.policy.workers.step_accounting import count_batch, max_over_ranks, step_metrics
from nemo_rl.models.policy.workers.rng_state import rng_state, set_rng_state
from nemo_rl.utils.flops import device_peak_flops
from nemo_rl.utils.hf_config import load_generation_config, load_hf_config

SCHEDULER_FILE = "scheduler.pt"  # in optimizer_path, written by rank 0
RNG_FILE = "rng_rank{rank}.pt"  # in optimizer_path, one per rank
log = logging.getLogger(__name__)


class MegatronPolicyWorker:
    def __init__(
        self,
        policy_cfg: PolicyConfig,
        *,
        seed: int,
        device: str,
        weights_path: str | None = None,
        optimizer_path: str | None = None,
    ):
        # megatron-core is an optional extra: imported here, so the DTensor path never needs it.
        from megatron.core import parallel_state as mpu
        from megatron.core.distributed import DistributedDataParallel
        from megatron.core.transformer.module import Float16Module

        from nemo_rl.models.megatron import hf_conversion, model_builder
        from nemo_rl.models.megatron.parallel_state import initialize_model_parallel
        from nemo_rl.models.megatron.training_optim import (
            DTYPES,
            build_optimizer,
            build_scheduler,
            ddp_config,
            has_transformer_engine,
        )
        from nemo_rl.models.megatron.training_step import VocabularyLogits, finalize_grads_without_token_scaling

        self.cfg = policy_cfg
        mcfg = policy_cfg.megatron_cfg
        self.rank, self.world_size, self.device = init_torch_distributed(device)
        if self.device.type == "cpu":
            if mcfg.sequence_parallel:
                raise ValueError(
                    "policy.megatron_cfg.sequence_parallel=true needs Transformer Engine or apex norms (GPU); "
                    "this worker runs on the CPU; set it to false"
                )
            from nemo_rl.models.megatron.cpu_support import enable_megatron_on_cpu

            enable_megatron_on_cpu()
        torch.manual_seed(seed)
        initialize_model_parallel(
            mcfg.tensor_model_parallel_size,
            mcfg.pipeline_model_parallel_size,
            mcfg.virtual_pipeline_model_parallel_size,
            mcfg.context_parallel_size,
            seed=seed,
        )
        self.dp_group = mpu.get_data_parallel_group()
        self.pp_group = mpu.get_pipeline_model_parallel_group()
        self.dp_rank, self.dp_size = mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size()

        self.hf_config = load_hf_config(
            policy_cfg.model_name, trust_remote_code=policy_cfg.trust_remote_code, overrides=policy_cfg.hf_config_overrides
        )
        self.vocabulary = VocabularyLogits(self.hf_config.vocab_size, self.device)
        # Written into hf/ at each save, as the DTensor backend does.
        self.generation_config = load_generation_config(policy_cfg.model_name, self.hf_config)
        fusions = _fusion_overrides(mcfg, has_transformer_engine())
        self.transformer_config = model_builder.transformer_config_from_hf(
            self.hf_config,
            tensor_parallel_size=mcfg.tensor_model_parallel_size,
            pipeline_model_parallel_size=mcfg.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=mcfg.virtual_pipeline_model_parallel_size,
            context_parallel_size=mcfg.context_parallel_size,
            sequence_parallel=mcfg.sequence_parallel,
            params_dtype=DTYPES[policy_cfg.precision],
            activation_checkpointing=mcfg.activation_checkpointing,
            pipeline_dtype=DTYPES[mcfg.pipeline_dtype or policy_cfg.precision],
            # Micro-batches are trimmed to their longest row, so stages exchange their shapes.
            variable_seq_lengths=mcfg.pipeline_model_parallel_size > 1,
            # Megatron checks it against variable_seq_lengths even for dense models.
            moe_token_dispatcher_type=mcfg.moe_token_dispatcher_type,
            # gloo has no batched, synchronised point-to-point; NCCL keeps Megatron's default.
            batch_p2p_sync=self.device.type != "cpu",
            calculate_per_token_loss=True,
            num_layers_in_first_pipeline_stage=mcfg.num_layers_in_first_pipeline_stage,
            num_layers_in_last_pipeline_stage=mcfg.num_layers_in_last_pipeline_stage,
            **fusions,
        )
        chunk = model_builder.build_gpt_model(
            self.hf_config,
            self.transformer_config,
            pre_process=mpu.is_pipeline_first_stage(ignore_virtual=True),
            post_process=mpu.is_pipeline_last_stage(ignore_virtual=True),
            vp_stage=None,
        )
        # The GPTModel chunks themselves (HF conversion and dist_checkpointing work on these).
        self.bare_chunks = [chunk]
        with torch.no_grad():
            hf_conversion.load_hf_weights_into(self.bare_chunks, policy_cfg.model_name, self.hf_config)
        self.lora_targets = self._apply_lora(seed)
        if policy_cfg.precision != "float32":
            chunk = Float16Module(self.transformer_config, chunk)
        use_distributed_optimizer = mcfg.optimizer.use_distributed_optimizer
        self.model_chunks = [
            DistributedDataParallel(
                config=self.transformer_config,
                ddp_config=ddp_config(mcfg.distributed_data_parallel_config, use_distributed_optimizer=use_distributed_optimizer),
                module=chunk,
            )
        ]
        for model in self.model_chunks:
            model.broadcast_params()
        self.transformer_config.finalize_model_grads_func = finalize_grads_without_token_scaling
        self.transformer_config.no_sync_func = self.model_chunks[0].no_sync
        self.transformer_config.grad_sync_func = None
        self.optimizer = build_optimizer(self.model_chunks, mcfg, precision=policy_cfg.precision)
        self.scheduler = build_scheduler(self.optimizer, mcfg)
        self.peak_flops, _ = device_peak_flops(self.device, DTYPES[policy_cfg.precision])
        self.parameter_counts = self._count_parameters()

        torch.manual_seed(seed + self.rank)
        if weights_path is not None:
            self._load_weights(weights_path)
        if optimizer_path is not None:
            self._load_optimizer(optimizer_path)

    # ------------------------------------------------------------------ train / eval

    def data_parallel_rank(self) -> int:
        """Which shard of each global batch this rank trains on."""
        return self.dp_rank

    def train(self, batch: BatchedDataDict, loss_fn: LossFn, plan: MicroBatchPlan) -> dict[str, Any]:
        """One optimizer step on this rank's shard of the global batch."""
        from nemo_rl.models.megatron.training_step import run_micro_batches

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        for model in self.model_chunks:
            model.train()
        lora_params = self.parameter_counts["trainable"] if self.lora_targets else None
        counts = count_batch(batch, self.hf_config, device=self.device, dp_group=self.dp_group, lora_params=lora_params)
        global_valid_tokens = counts.global_valid_tokens

        for model in self.model_chunks:
            model.zero_grad_buffer()
        self.optimizer.zero_grad()
        reported = run_micro_batches(
            self.model_chunks,
            self._micro_batches(batch, plan),
            loss_fn,
            global_valid_tokens,
            vocabulary=self.vocabulary,
            device=self.device,
            forward_only=False,
        )
        loss_sum = self._sum_over_pipeline_and_data(reported, "loss")

        found_inf = self.optimizer.prepare_grads()
        grad_norm = float(self.optimizer.get_grad_norm())
        lr = self.optimizer.param_groups[0]["lr"]
        # Both numbers are global, so every rank takes the same branch; the schedule advances.
        update_skipped = bool(found_inf) or not (math.isfinite(loss_sum) and math.isfinite(grad_norm))
        if not update_skipped:
            clip_grad = self.cfg.megatron_cfg.optimizer.clip_grad
            if clip_grad:
                self.optimizer.clip_grad_norm(clip_grad)
            self.optimizer.step_with_ready_grads()
        self.scheduler.step(increment=1)
        self._maybe_empty_cache(level=1)
        return step_metrics(
            counts,
            loss=loss_sum,
            grad_norm=grad_norm,
            lr=lr,
            device=self.device,
            peak_flops=self.peak_flops,
            update_skipped=update_skipped,
        )

    @torch.no_grad()
    def validate(self, batch: BatchedDataDict, loss_fn: LossFn, plan: MicroBatchPlan) -> dict[str, float]:
        """This data-parallel rank's loss sum (global_valid_tokens = 1) and valid-token count,
        the same on every rank of its tensor x pipeline group."""
        from nemo_rl.models.megatron.training_step import run_micro_batches

        for model in self.model_chunks:
            model.eval()
        reported = run_micro_batches(
            self.model_chunks,
            self._micro_batches(batch, plan),
            loss_fn,
            torch.ones((), device=self.device),
            vocabulary=self.vocabulary,
            device=self.device,
            forward_only=True,
        )
        return {
            "loss_sum": self._sum_over_pipeline_and_data(reported, "loss", over_data=False),
            "num_valid_tokens": self._sum_over_pipeline_and_data(reported, "num_valid_tokens", over_data=False),
        }

    def generate_greedy(self, batch: BatchedDataDict, *, max_new_tokens: int) -> list[list[int]]:
        raise NotImplementedError(
            "sft.val_generation with policy.megatron_cfg.enabled=true: generation is not available on "
            "the Megatron backend in this build; set sft.val_generation.enabled=false"
        )

    def _micro_batches(self, batch: BatchedDataDict, plan: MicroBatchPlan) -> list[BatchedDataDict]:
        return micro_batches(batch, plan, max_over_ranks=lambda n: max_over_ranks(n, self.device))

    def _sum_over_pipeline_and_data(self, reported: list[dict[str, torch.Tensor]], key: str, *, over_data: bool = True) -> float:
        """The sum of `key` over this rank's micro-batches, which only the last pipeline stage
        has, shared with the other stages, and summed over the data-parallel ranks."""
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for values in reported:
            total += values[key].to(self.device)
        dist.all_reduce(total, group=self.pp_group)  # the other stages hold 0
        if over_data:
            dist.all_reduce(total, group=self.dp_group)
        return total.item()

    def _maybe_empty_cache(self, level: int) -> None:
        if self.device.type == "cuda" and self.cfg.megatron_cfg.empty_unused_memory_level >= level:
            torch.cuda.empty_cache()

    def _count_parameters(self) -> dict[str, int]:
        """Of the whole model: each tensor-parallel shard once, replicated tensors once."""
        from megatron.core import parallel_state as mpu
        from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

        local = [0, 0]  # total, trainable
        for chunk in self.bare_chunks:
            for name, p in chunk.named_parameters():
                # A later stage's copy of the tied embedding is counted at the embedding only.
                tied_copy = name == "output_layer.weight" and chunk.share_embeddings_and_output_weights
                if not tied_copy and (param_is_not_tensor_parallel_duplicate(p) or mpu.get_tensor_model_parallel_rank() == 0):
                    local[0] += p.numel()
                    local[1] += p.numel() if p.requires_grad else 0
        total = torch.tensor(local, dtype=torch.int64, device=self.device)
        dist.all_reduce(total, group=mpu.get_model_parallel_group())
        return {"trainable": int(total[1]), "total": int(total[0]), "lora_modules": len(self.lora_targets)}

    def get_parameter_counts(self) -> dict[str, int]:
        return dict(self.parameter_counts)

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(
        self,
        *,
        weights_path: str | None,
        optimizer_path: str | None = None,
        hf_path: str | None = None,
        hf_merged_path: str | None = None,
        hf_dtype: str | None = None,
    ) -> None:
        """Sharded weights (and optimizer + schedule + RNG) with dist_checkpointing, and the
        Hugging Face directory at `hf_path` (written by rank 0) in `hf_dtype` (default: the
        training precision's compute dtype, float32 on CPU, as on the DTensor backend).
        A LoRA run (models/megatron/lora.py) saves its adapters only, `hf_path` as a PEFT adapter
        directory, and `hf_merged_path` as the base with the adapter merged in."""
        from megatron.core import dist_checkpointing

        from nemo_rl.models.megatron import hf_conversion, optimizer_checkpoint

        if hf_merged_path is not None and not self.lora_targets:
            raise ValueError("checkpointing.save_merged is for LoRA runs (policy.megatron_cfg.peft.enabled=true)")
        for path in (weights_path, optimizer_path):
            if path is not None:  # dist_checkpointing writes into an existing directory
                os.makedirs(path, exist_ok=True)
        if weights_path is not None:
            dist_checkpointing.save(self._model_sharded_state_dict(), weights_path)
        if optimizer_path is not None:
            self._ensure_optimizer_states()
            state = self.optimizer.sharded_state_dict(
                self._model_sharded_state_dict(), metadata=optimizer_checkpoint.sharding_metadata(optimizer_checkpoint.WRITTEN_FORM)
            )
            dist_checkpointing.save({"optimizer": state}, optimizer_path)
            if self.rank == 0:
                torch.save(self.scheduler.state_dict(), os.path.join(optimizer_path, SCHEDULER_FILE))
                optimizer_checkpoint.write_layout(optimizer_path, self._layout())
            dist.barrier()
            torch.save(rng_state(self.device), os.path.join(optimizer_path, RNG_FILE.format(rank=self.rank)))
        dtype = hf_export_dtype(hf_dtype, self.device, self.cfg.precision)
        if hf_path is not None and self.lora_targets:
            self._save_lora(hf_path, hf_merged_path, dtype)
        elif hf_path is not None:
            hf_conversion.save_hf_model(
                self.bare_chunks, self.hf_config, hf_path, dtype=dtype, generation_config=self.generation_config
            )
        dist.barrier()

    def _apply_lora(self, seed: int) -> list[str]:
        """LoRA adapters on the loaded base (frozen), before DDP builds its gradient buffers."""
        peft = self.cfg.megatron_cfg.peft
        if not peft.enabled:
            return []
        from nemo_rl.models.megatron import lora

        return lora.apply_lora(self.bare_chunks, peft, num_layers=self.hf_config.num_hidden_layers, seed=seed)

    def _save_lora(self, hf_path: str, merged_path: str | None, dtype: torch.dtype) -> None:
        """hf_path: the PEFT adapter directory (HF module names); merged_path: the base with the
        adapter merged in, a full HF model directory."""
        from nemo_rl.models.megatron import hf_conversion, lora

        peft = self.cfg.megatron_cfg.peft
        lora.save_adapter(self.bare_chunks, self.hf_config, hf_path, peft, base_model=self.cfg.model_name, targets=self.lora_targets)
        if merged_path is not None:
            with lora.merged_into_base(self.bare_chunks):
                hf_conversion.save_hf_model(
                    self.bare_chunks, self.hf_config, merged_path, dtype=dtype, generation_config=self.generation_config
                )

    def _model_sharded_state_dict(self) -> dict[str, Any]:
        """What trains: the whole model, or a LoRA run's adapters only (the frozen base comes
        from model_name again on resume, as on the DTensor backend)."""
        state = self.bare_chunks[0].sharded_state_dict()
        if self.lora_targets:
            from nemo_rl.models.megatron.lora import is_adapter_key

            state = {key: value for key, value in state.items() if is_adapter_key(key)}
        return state

    def _ensure_optimizer_states(self) -> None:
        """Adam creates its states at the first step; a checkpoint before it needs them (zeros,
        step 0) for the save to describe every shard."""
        from nemo_rl.models.megatron.training_step import ensure_optimizer_states

        ensure_optimizer_states(self.optimizer)

    def _load_weights(self, weights_path: str) -> None:
        from megatron.core import dist_checkpointing

        from nemo_rl.models.megatron.lora import is_adapter_key

        with torch.no_grad():
            state = dist_checkpointing.load(self._model_sharded_state_dict(), weights_path)
            missing, unexpected = self.bare_chunks[0].load_state_dict(state, strict=not self.lora_targets)
            if unexpected or any(is_adapter_key(key) for key in missing):
                raise ValueError(f"{weights_path}: not this run's LoRA adapters (missing {missing[:4]}, unexpected {unexpected[:4]})")
        # The optimizer's fp32 master copies (mixed precision) follow the loaded weights.
        if hasattr(self.optimizer, "reload_model_params"):
            self.optimizer.reload_model_params()

    def _load_optimizer(self, optimizer_path: str) -> None:
        from megatron.core import dist_checkpointing

        from nemo_rl.models.megatron import optimizer_checkpoint

        # Written in another tensor / pipeline layout, it reshards (or says why it cannot).
        form = optimizer_checkpoint.form_to_read(optimizer_path, self._layout())
        self._ensure_optimizer_states()
        with torch.no_grad():
            template = self.optimizer.sharded_state_dict(
                self._model_sharded_state_dict(), is_loading=True, metadata=optimizer_checkpoint.sharding_metadata(form)
            )
            state = dist_checkpointing.load({"optimizer": template}, optimizer_path)
            optimizer_checkpoint.load_optimizer_state(self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(torch.load(os.path.join(optimizer_path, SCHEDULER_FILE)))
        rng_file = os.path.join(optimizer_path, RNG_FILE.format(rank=self.rank))
        if os.path.exists(rng_file):  # absent when resuming at a larger world size
            set_rng_state(torch.load(rng_file), self.device)

    def _layout(self) -> dict[str, int]:
        mcfg = self.cfg.megatron_cfg
        return {
            "tensor_model_parallel_size": mcfg.tensor_model_parallel_size,
            "pipeline_model_parallel_size": mcfg.pipeline_model_parallel_size,
        }

    def shutdown(self) -> None:
        from nemo_rl.models.megatron.parallel_state import destroy_model_parallel

        destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()


def _fusion_overrides(mcfg, have_te: bool) -> dict[str, bool]:
    """Kernel fusions change speed, not results: on where asked and Transformer Engine provides
    them; asked for without it, said once and left off."""
    from nemo_rl.config.megatron_schema import FUSION_KEYS

    asked = [key for key in FUSION_KEYS if getattr(mcfg, key)]
    if asked and not have_te:
        log.warning("policy.megatron_cfg %s: fused kernels need Transformer Engine, not installed; using the plain kernels", asked)
        return {}
    return {key: True for key in asked if key != "moe_permute_fusion"}


