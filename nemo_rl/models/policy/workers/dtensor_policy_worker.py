"""One data-parallel rank of a Hugging Face causal LM trained with FSDP2 (DTensor).

A plain class: `RayWorkerGroup` wraps it with `ray.remote`, and tests may construct it
directly in processes that have RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set. All
ranks call each method together (every method runs collectives).

Shape legend: B batch, T time (tokens), V vocabulary.

What one `train(batch, loss_fn, plan)` call does, for this rank's shard of the global batch:
  1. all-reduce the count of valid target tokens (and samples) over the data-parallel ranks;
  2. per micro-batch of `plan` (models/policy/micro_batching.py): forward, the algorithm's
     `loss_fn` (models/policy/interfaces.py: its sum divided by the global valid tokens), backward;
     FSDP reduce-scatters each micro-batch's gradients with a SUM over ranks (see
     `parallelize.apply_fsdp`), so the accumulated gradient is that of the global-mean loss
     (a lone fp32 rank trains the plain module: `parallelize.fsdp_is_needed`);
  3. global gradient norm (over all shards), clip at `max_grad_norm`, optimizer and
     scheduler step, zero the gradients. A non-finite loss or gradient norm skips the
     optimizer step on every rank (`update_skipped` in the result).
"""

from __future__ import annotations

import logging
import contextlib
import math
import os
from typing import Any

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
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import loss_parallel

from nemo_rl.config.schema import PolicyConfig
from nemo_rl.data.batched_data_dict import BatchedDataDict
from nemo_rl.distributed.worker_env import init_torch_distributed
from nemo_rl.models.context_parallel import (
    LAYOUT_KWARG,
    check_attention_was_hooked,
    enable_context_parallel_attention,
    pad_one_position,
    shard_micro_batch,
)
from nemo_rl.models.lora import apply_lora, is_lora_key, parameter_counts, peft_target_modules, save_peft_adapter
from nemo_rl.models.lora_merge import lora_merge_slices
from nemo_rl.models.parallelize import (
    PRECISIONS,
    apply_activation_checkpointing,
    apply_compile,
    apply_fsdp,
    apply_tensor_parallel,
    build_device_mesh,
    decoder_layers,
    fsdp_is_needed,
    hf_export_dtype,
    load_parallel_plan,
    tensor_parallel_plan,
    tensor_parallel_problem,
)
from nemo_rl.models.sharded_loading import build_meta_model, load_hf_shards
from nemo_rl.models.policy.forward import (
    forward_hidden_states,
    forward_logits,
    output_layer_gives_logits,
    packed_attention_is_isolated,
)
from nemo_rl.models.policy.hf_export import save_hf_checkpoint_sharded, shared_parameter_aliases
from nemo_rl.models.policy.interfaces import LossFn, LossResult
from nemo_rl.models.policy.micro_batching import MicroBatchPlan, micro_batches
from nemo_rl.models.policy.optim import build_optimizer, build_scheduler
from nemo_rl.models.policy.workers.step_accounting import count_batch, max_over_ranks, step_metrics
from nemo_rl.models.policy.workers.rng_state import rng_state, set_rng_state
from nemo_rl.utils.flops import device_peak_flops
from nemo_rl.utils.hf_config import load_hf_config

SCHEDULER_FILE = "scheduler.pt"  # in optimizer_path, written by rank 0
RNG_FILE = "rng_rank{rank}.pt"  # in optimizer_path, one per rank (dropout streams)
log = logging.getLogger(__name__)


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

        # Every rank builds the same model: same seed for the LoRA adapters.
        torch.manual_seed(seed)
        # The fp32 master copy (`policy.precision` only sets the compute dtype, below), its
        # parameters on the meta device until each rank loads its own shards of them.
        model = build_meta_model(
            policy_cfg.model_name,
            config=load_hf_config(
                policy_cfg.model_name,
                trust_remote_code=policy_cfg.trust_remote_code,
                overrides=policy_cfg.hf_config_overrides,
            ),
            trust_remote_code=policy_cfg.trust_remote_code,
            attn_implementation=policy_cfg.dtensor_cfg.attn_implementation,
        )
        lora_rng_state = torch.get_rng_state()
        lora_cfg = policy_cfg.dtensor_cfg.lora_cfg
        self.lora_targets = apply_lora(model, lora_cfg) if lora_cfg.enabled else []
        self.parameter_counts = {**parameter_counts(model), "lora_modules": len(self.lora_targets)}
        if self.rank == 0:
            log.info("parameters: %(trainable)d trainable of %(total)d", self.parameter_counts)
        self.tied_keys = shared_parameter_aliases(model)
        parallel = policy_cfg.dtensor_cfg
        self.tensor_parallel = parallel.tensor_parallel_size > 1
        self.context_parallel = parallel.context_parallel_size > 1
        mesh = build_device_mesh(
            self.device.type,
            self.world_size,
            tensor_parallel_size=parallel.tensor_parallel_size,
            context_parallel_size=parallel.context_parallel_size,
            dp_replicate_size=parallel.dp_replicate_size,
        )
        self.mesh = mesh
        # The ranks that see different data: counts and losses are summed over these only
        # (the ranks of one tensor-parallel group hold the same rows).
        self.dp_group = mesh.dp.get_group()
        self.dp_rank, self.dp_size = mesh.dp.get_local_rank(), mesh.dp.size()
        # Under context parallelism the ranks of a cp group hold different tokens of the same
        # rows: the loss is summed over data- and context-parallel ranks together.
        self.loss_group = self.dp_group
        if self.context_parallel:
            self.cp_group, self.cp_rank = mesh.root["cp"].get_group(), mesh.root["cp"].get_local_rank()
            self.loss_group = mesh.root["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp").get_group()
            self.attention_layers = len(decoder_layers(model))
        if self.tensor_parallel:
            problem = tensor_parallel_problem(model.config, parallel.tensor_parallel_size)
            if problem:
                raise ValueError(f"{problem} ({policy_cfg.model_name})")
            if parallel.custom_parallel_plan is not None:
                plan = load_parallel_plan(parallel.custom_parallel_plan, model, sequence_parallel=parallel.sequence_parallel)
            else:
                plan = tensor_parallel_plan(model, sequence_parallel=parallel.sequence_parallel)
            apply_tensor_parallel(model, mesh.tp, plan)
            # DTensor warns on every gradient-norm reduction and full-state gather over the 2-D
            # (dp, tp) mesh that it runs two collectives instead of one: expected here, and
            # repeated every step by every rank.
            logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
            # Generation takes the argmax over the whole vocabulary: only it gathers the logits.
            self._gather_logits = False
            model.get_output_embeddings().register_forward_hook(self._maybe_gather_logits)
        if policy_cfg.dtensor_cfg.activation_checkpointing:
            apply_activation_checkpointing(model)
        self.fully_sharded = fsdp_is_needed(
            self.world_size, param_dtype=PRECISIONS[policy_cfg.precision], cpu_offload=policy_cfg.dtensor_cfg.cpu_offload
        )
        if self.fully_sharded:
            apply_fsdp(
                model,
                mesh.fsdp,
                param_dtype=PRECISIONS[policy_cfg.precision],
                reduce_dtype=torch.float32,
                cpu_offload=policy_cfg.dtensor_cfg.cpu_offload,
            )
        self.load_report = load_hf_shards(
            model,
            policy_cfg.model_name,
            device="cpu" if policy_cfg.dtensor_cfg.cpu_offload else self.device,
            lora_targets=self.lora_targets,
            lora_rng_state=lora_rng_state,
        )
        self.model = model
        self._check_model_behaviour()
        if self.context_parallel:  # after the checks, which run whole rows on every rank
            enable_context_parallel_attention(model)
        if policy_cfg.dtensor_cfg.compile:  # after the checks, which would compile for their shapes
            apply_compile(model)
        self.optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], policy_cfg.optimizer)
        self.scheduler = build_scheduler(self.optimizer, *policy_cfg.scheduler_entries())
        self.peak_flops, _ = device_peak_flops(self.device, PRECISIONS[policy_cfg.precision])

        # Randomness that should differ per rank (dropout) from here on.
        torch.manual_seed(seed + self.rank)
        if weights_path is not None:
            self._load_weights(weights_path)
        if optimizer_path is not None:
            self._load_optimizer(optimizer_path)

    def _check_model_behaviour(self) -> None:
        """Checked on the loaded (sharded) model with a few tokens rather than assumed; see
        models/policy/forward.py. All ranks run the same forwards."""
        parallel = self.cfg.dtensor_cfg
        self._gather_logits = True  # the checks compare whole logits
        self.chunked_loss = parallel.chunked_loss and output_layer_gives_logits(self.model)
        if self.cfg.sequence_packing.enabled and not packed_attention_is_isolated(self.model):
            raise ValueError(
                f"policy.sequence_packing: {self.cfg.model_name} lets packed samples attend to each "
                "other (its attention ignores restarting position_ids); use policy.dynamic_batching"
            )
        self._gather_logits = False
        if self.fully_sharded:
            # FSDP leaves the root's parameters gathered after a forward; the optimizer must
            # see the sharded ones.
            self.model.reshard()

    # ------------------------------------------------------------------ train / eval

    def data_parallel_rank(self) -> int:
        """Which shard of each global batch this rank trains on (tensor- x context-parallel
        ranks are consecutive, see `parallelize.build_device_mesh`)."""
        return self.dp_rank

    def train(self, batch: BatchedDataDict, loss_fn: LossFn, plan: MicroBatchPlan) -> dict[str, Any]:
        """One optimizer step on this rank's shard of the global batch."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.model.train()

        lora_params = self.parameter_counts["trainable"] if self.lora_targets else None
        counts = count_batch(batch, self.model.config, device=self.device, dp_group=self.dp_group, lora_params=lora_params)
        global_valid_tokens = counts.global_valid_tokens

        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for mb in self._micro_batches(batch, plan):
            with self._loss_context():
                loss, _ = self._loss(loss_fn, mb.to(self.device), global_valid_tokens)
                loss.backward()
            loss_sum += loss.detach()
            del loss  # free this micro-batch's activations before the next forward
        dist.all_reduce(loss_sum, group=self.loss_group)

        grad_norm = self._clip_grad_norm()
        lr = self.optimizer.param_groups[0]["lr"]
        # Never apply a non-finite update (the driver stops or goes on, per its config). Both
        # numbers are global, so every rank takes the same branch; the schedule still advances.
        update_skipped = not (math.isfinite(loss_sum.item()) and math.isfinite(grad_norm))
        if not update_skipped:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return step_metrics(
            counts,
            loss=loss_sum.item(),
            grad_norm=grad_norm,
            lr=lr,
            device=self.device,
            peak_flops=self.peak_flops,
            update_skipped=update_skipped,
        )

    @torch.no_grad()
    def validate(self, batch: BatchedDataDict, loss_fn: LossFn, plan: MicroBatchPlan) -> dict[str, float]:
        """This rank's loss sum (each micro-batch's loss with global_valid_tokens = 1) and its
        valid-token count; the caller adds them up over ranks and batches and divides once."""
        self.model.eval()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        num_valid_tokens = 0.0
        for mb in self._micro_batches(batch, plan):
            with self._loss_context():
                loss, metrics = self._loss(loss_fn, mb.to(self.device), torch.ones((), device=self.device))
            loss_sum += loss
            num_valid_tokens += metrics["num_valid_tokens"].item()
        if self.context_parallel:  # each cp rank holds part of every row's tokens
            totals = torch.tensor([loss_sum.item(), num_valid_tokens], dtype=torch.float64, device=self.device)
            dist.all_reduce(totals, group=self.cp_group)
            loss_sum, num_valid_tokens = totals[0], totals[1].item()
        return {"loss_sum": loss_sum.item(), "num_valid_tokens": num_valid_tokens}

    @torch.no_grad()
    def get_logits(self, batch: BatchedDataDict) -> torch.Tensor:
        """logits_BTV (fp32, CPU) for this rank's `batch`, padding positions included."""
        self.model.eval()
        return _full_tensor(forward_logits(self.model, batch.to(self.device))).float()

    @torch.no_grad()
    def generate_greedy(self, batch: BatchedDataDict, *, max_new_tokens: int) -> list[list[int]]:
        """The greedy continuation of each of this rank's prompts (right-padded `input_ids`,
        `input_lengths`): its new token ids, up to and including an end-of-sequence token.

        Every forward all-gathers the FSDP shards, so all ranks must run the same number of
        them: each rank gets as many prompts (a padding row, length 0, still steps along), and
        `synced_gpus` keeps a rank that has finished stepping until every rank has.
        """
        self.model.eval()
        generation_config = self.model.generation_config
        eos_ids = _token_ids(generation_config.eos_token_id)
        pad_id = generation_config.pad_token_id
        pad_id = pad_id if pad_id is not None else (eos_ids[0] if eos_ids else 0)
        continuations = []
        self._gather_logits = True
        for row in range(batch.size):
            length = max(int(batch["input_lengths"][row]), 1)
            prompt_1T = batch["input_ids"][row : row + 1, :length].to(self.device)
            out_1T = self.model.generate(
                input_ids=prompt_1T,
                attention_mask=torch.ones_like(prompt_1T),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                synced_gpus=self.world_size > 1,
                pad_token_id=pad_id,
            )
            new_ids = out_1T[0, length:].tolist()
            end = next((i + 1 for i, token in enumerate(new_ids) if token in eos_ids), len(new_ids))
            continuations.append(new_ids[:end])
        self._gather_logits = False
        return continuations

    def _maybe_gather_logits(self, module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        return output.full_tensor() if self._gather_logits and isinstance(output, DTensor) else output

    def _loss_context(self) -> contextlib.AbstractContextManager:
        """Cross-entropy on vocabulary-sharded logits (TP): each rank reduces its slice of the
        vocabulary and they exchange per-token maxima and sums, never the logits."""
        return loss_parallel() if self.tensor_parallel else contextlib.nullcontext()

    def _micro_batches(self, batch: BatchedDataDict, plan: MicroBatchPlan) -> list[BatchedDataDict]:
        return micro_batches(batch, plan, max_over_ranks=lambda n: max_over_ranks(n, self.device))

    def _loss(self, loss_fn: LossFn, mb: BatchedDataDict, global_valid_tokens: torch.Tensor) -> LossResult:
        """From hidden states (no full logits) where the loss function and the model allow it."""
        if self.context_parallel:
            return self._context_parallel_loss(loss_fn, mb, global_valid_tokens)
        if self.chunked_loss and loss_fn.computes_from_hidden_states:
            hidden_BTH = forward_hidden_states(self.model, mb)
            output_layer = self.model.get_output_embeddings()
            if _is_tensor_parallel(output_layer.weight) and not isinstance(hidden_BTH, DTensor):
                # The same on every rank of the group; the chunked loss feeds it to the
                # column-parallel output layer as such (see algorithms/chunked_loss.py). A
                # custom plan may leave the output layer out of TP: then it stays a tensor.
                hidden_BTH = DTensor.from_local(hidden_BTH, self.mesh.tp, [Replicate()], run_check=False)
            return loss_fn.from_hidden_states(hidden_BTH, output_layer, mb, global_valid_tokens)
        return loss_fn(forward_logits(self.model, mb), mb, global_valid_tokens)

    def _context_parallel_loss(self, loss_fn: LossFn, mb: BatchedDataDict, global_valid_tokens: torch.Tensor) -> LossResult:
        """The loss of this rank's tokens of `mb` (models/context_parallel.py)."""
        sequence_parallel_size = self.cfg.dtensor_cfg.tensor_parallel_size if self.cfg.dtensor_cfg.sequence_parallel else 1
        local = shard_micro_batch(
            mb.to("cpu"),
            cp_size=self.cfg.dtensor_cfg.context_parallel_size,
            cp_rank=self.cp_rank,
            group=self.cp_group,
            length_multiple=sequence_parallel_size,
        )
        inputs, loss_batch, layout = local.model_inputs.to(self.device), local.loss_batch.to(self.device), local.layout.to(self.device)
        if self.chunked_loss and loss_fn.computes_from_hidden_states:
            hidden_BLH = forward_hidden_states(self.model, inputs, **{LAYOUT_KWARG: layout})
            check_attention_was_hooked(layout, self.attention_layers, self.cfg.model_name)
            output_layer = self.model.get_output_embeddings()
            return loss_fn.from_hidden_states(pad_one_position(hidden_BLH), output_layer, loss_batch, global_valid_tokens)
        logits_BLV = forward_logits(self.model, inputs, **{LAYOUT_KWARG: layout})
        check_attention_was_hooked(layout, self.attention_layers, self.cfg.model_name)
        return loss_fn(pad_one_position(logits_BLV), loss_batch, global_valid_tokens)

    def _clip_grad_norm(self) -> float:
        """The norm of the whole gradient (all shards), clipped to `max_grad_norm` if set."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        # Under tensor parallelism some parameters live on the (dp, tp) mesh and others (not in
        # the plan) on the data-parallel mesh only; DTensor cannot stack norms across meshes.
        by_mesh: dict[Any, list[torch.Tensor]] = {}
        for p in params:
            by_mesh.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p)
        norms = []
        for group in by_mesh.values():
            norm = torch.nn.utils.get_total_norm([p.grad for p in group], norm_type=2.0)
            if isinstance(norm, DTensor):
                # The per-shard norms are a Partial placement; full_tensor() reduces them.
                norm = norm.full_tensor()
            norms.append(norm)
        total_norm = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))
        if self.cfg.max_grad_norm is not None:
            for group in by_mesh.values():
                torch.nn.utils.clip_grads_with_norm_(group, self.cfg.max_grad_norm, total_norm)
        return total_norm.item()

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
        """Writes into the given directories (each rank its shard); the driver renames.

        A LoRA run writes its adapter only (weights_path, and hf_path as a PEFT adapter
        directory); `hf_merged_path`, if given, gets the base with the adapter merged in.
        """
        if weights_path is not None:
            dcp.save(self._trainable_state_dict(), checkpoint_id=weights_path)
        if optimizer_path is not None:
            dcp.save(get_optimizer_state_dict(self.model, self.optimizer), checkpoint_id=optimizer_path)
            if self.rank == 0:
                torch.save(self.scheduler.state_dict(), os.path.join(optimizer_path, SCHEDULER_FILE))
            torch.save(rng_state(self.device), os.path.join(optimizer_path, RNG_FILE.format(rank=self.rank)))
        if hf_path is not None and self.lora_targets:
            self._save_lora(hf_path, hf_merged_path, hf_dtype)
        elif hf_path is not None:
            # Every rank writes its own slices into the files; nothing is gathered.
            self._save_hf_sharded(get_model_state_dict(self.model), hf_path, hf_dtype)
        dist.barrier()

    def _trainable_state_dict(self, state_dict: dict[str, Any] | None = None) -> dict[str, Any]:
        """This rank's shards of what trains (of `state_dict`, by default the model's): the whole
        model, or a LoRA run's adapter only (the frozen base, tied aliases included, comes from
        `model_name` again on resume)."""
        frozen = {name for name, p in self.model.named_parameters(remove_duplicate=False) if not p.requires_grad}
        state_dict = get_model_state_dict(self.model) if state_dict is None else state_dict
        return {k: v for k, v in state_dict.items() if k not in frozen}

    def _save_hf_sharded(self, state_dict: dict[str, Any], path: str, hf_dtype: str | None, **kwargs: Any) -> None:
        """An HF model directory written by all ranks from their shards, in `hf_dtype` (default:
        the training precision's compute dtype, float32 on CPU)."""
        save_hf_checkpoint_sharded(
            state_dict,
            path,
            dtype=hf_export_dtype(hf_dtype, self.device, self.cfg.precision),
            config=self.model.config,
            generation_config=self.model.generation_config,
            trust_remote_code=self.cfg.trust_remote_code,
            tied_keys=self.tied_keys,
            **kwargs,
        )

    def _save_lora(self, hf_path: str, merged_path: str | None, hf_dtype: str | None) -> None:
        """Rank 0 writes the PEFT adapter directory (the adapter, small, is gathered on every
        rank); all ranks write the merged model from their own base shards, each merging the
        adapter into its slices (lora_merge.py), so the base is never gathered."""
        lora_cfg = self.cfg.dtensor_cfg.lora_cfg
        state_dict = get_model_state_dict(self.model)
        adapter = {k: _full_tensor(v) for k, v in self._trainable_state_dict(state_dict).items()}
        if self.rank == 0:
            target_modules = peft_target_modules(self.model, self.lora_targets)
            save_peft_adapter(adapter, hf_path, lora_cfg, base_model=self.cfg.model_name, target_modules=target_modules)
        if merged_path is not None:
            base = {k: v for k, v in state_dict.items() if not is_lora_key(k)}
            merge = lora_merge_slices(adapter, lora_cfg, base_keys=set(base))
            self._save_hf_sharded(base, merged_path, hf_dtype, transform_slice=merge)

    def get_parameter_counts(self) -> dict[str, int]:
        """{"trainable", "total"} parameters of the whole (unsharded) model; "lora_modules"."""
        return dict(self.parameter_counts)

    def _load_weights(self, weights_path: str) -> None:
        state_dict = self._trainable_state_dict()
        dcp.load(state_dict, checkpoint_id=weights_path)  # fails on any key the checkpoint lacks
        # not strict: a LoRA run's frozen base weights are not in the checkpoint.
        set_model_state_dict(self.model, state_dict, options=StateDictOptions(strict=False))

    def _load_optimizer(self, optimizer_path: str) -> None:
        state_dict = get_optimizer_state_dict(self.model, self.optimizer)
        dcp.load(state_dict, checkpoint_id=optimizer_path)
        set_optimizer_state_dict(self.model, self.optimizer, state_dict)
        self.scheduler.load_state_dict(torch.load(os.path.join(optimizer_path, SCHEDULER_FILE)))
        rng_file = os.path.join(optimizer_path, RNG_FILE.format(rank=self.rank))
        if os.path.exists(rng_file):  # absent when resuming at a larger world size
            set_rng_state(torch.load(rng_file), self.device)

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def _config_override_kwargs(policy_cfg: PolicyConfig) -> dict[str, Any]:
    """`config=` with `policy.hf_config_overrides` applied, or nothing when there are none (the
    model then loads exactly as before)."""
    if not policy_cfg.hf_config_overrides:
        return {}
    config = load_hf_config(
        policy_cfg.model_name,
        trust_remote_code=policy_cfg.trust_remote_code,
        overrides=policy_cfg.hf_config_overrides,
    )
    return {"config": config}


def _token_ids(value: int | list[int] | None) -> list[int]:
    """A generation config's token id field (one id, a list, or None) as a list."""
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _full_tensor(value: Any) -> Any:
    """The whole tensor on CPU (all-gathered from the ranks' shards if it is a DTensor)."""
    if isinstance(value, DTensor):
        # With cpu_offload the shards live on the CPU; NCCL gathers only device tensors.
        value = value.to(value.device_mesh.device_type).full_tensor()
    return value.cpu() if isinstance(value, torch.Tensor) else value


def _is_tensor_parallel(weight: torch.Tensor) -> bool:
    """Split over the tensor-parallel mesh dimension (and not only sharded by FSDP)."""
    return isinstance(weight, DTensor) and "tp" in (weight.device_mesh.mesh_dim_names or ())
