"""Supervised fine-tuning: setup, validate, train.

The driver owns the data loaders, logging and checkpoint bookkeeping; the policy workers
own the model shards. Each function here reads top to bottom and calls the rest by name.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torchdata.stateful_dataloader import StatefulDataLoader

from nemo_rl.algorithms.loss_functions import NLLLoss
from nemo_rl.algorithms.resume import (
    FINGERPRINT_KEY,
    check_same_data_order,
    data_fingerprint,
    last_checkpoint,
    load_driver_state,
    resume_hint,
    resume_hint_on_failure,
    save_driver_state,
    seed_driver_rngs,
    select_checkpoint,
)
from nemo_rl.algorithms.val_samples import first_val_samples, print_val_samples, score_val_generations
from nemo_rl.config import ConfigError, MasterConfig, config_to_yaml
from nemo_rl.config.schema import PolicyConfig, batch_split_problem
from nemo_rl.data.dataloaders import build_dataloaders
from nemo_rl.data.datasets import load_datasets
from nemo_rl.data.processors import TokenizationOptions
from nemo_rl.data.tokenizer import get_tokenizer
from nemo_rl.distributed import RayVirtualCluster, WorkerDiedError, init_ray, resolve_device, shutdown_ray
from nemo_rl.distributed.devices import Device
from nemo_rl.models.lora import describe_parameters
from nemo_rl.models.parallelize import check_parallel_layout, import_parallel_plan
from nemo_rl.models.policy import Policy
from nemo_rl.models.policy.interfaces import LossFn
from nemo_rl.models.policy.optim import check_optimizer_config
from nemo_rl.utils.checkpoint import CheckpointManager
from nemo_rl.utils.flops import mfu
from nemo_rl.utils.hf_config import load_hf_config
from nemo_rl.utils.gpu_monitor import GpuMonitor, start_gpu_monitor
from nemo_rl.utils.logger import Logger
from nemo_rl.utils.preflight import preflight
from nemo_rl.utils.progress import ProgressReporter, print_run_header
from nemo_rl.utils.signals import StopRequests
from nemo_rl.utils.timer import Timer


@dataclass
class SFTProgress:
    """The driver's training state; it is what `training_info.json` records."""

    step: int = 0
    epoch: int = 0
    consumed_samples: int = 0
    skipped_updates: int = 0  # steps whose non-finite update was not applied
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class SFTRun:
    cfg: MasterConfig
    tokenizer: Any
    train_dataloader: StatefulDataLoader
    val_dataloader: StatefulDataLoader | None
    device: Device
    cluster: RayVirtualCluster
    policy: Policy
    loss_fn: LossFn
    logger: Logger
    checkpointer: CheckpointManager
    progress: SFTProgress
    resumed_from: Path | None
    overlength_counts: dict[str, dict[str, int]]
    data_fingerprint: dict[str, Any] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)  # checkpoint_must_save_by counts from here
    restarts: int = 0  # worker-group restarts after a worker died
    gpu_monitor: GpuMonitor | None = None  # logger.monitor_gpus on a cluster with GPUs

    def shutdown(self) -> None:
        if self.gpu_monitor is not None:
            self.gpu_monitor.stop()
        self.policy.shutdown()
        self.cluster.shutdown()
        shutdown_ray()


def setup(cfg: MasterConfig, config_path: str | Path | None = None) -> SFTRun:
    """The run's header (device and checkpoint resolved), then data (bad data fails before any
    worker starts), then Ray, then the policy."""
    started_at = time.time()
    device = _resolve_device(cfg)
    check_parallel_layout(cfg.policy)
    check_import_paths(cfg)
    checkpointer = CheckpointManager(cfg.checkpointing)
    resumed_from = select_checkpoint(checkpointer, cfg.checkpointing.resume, enabled=cfg.checkpointing.enabled)
    print_run_header(cfg, config_path, device=device, resumes_from=resumed_from)

    tokenizer = get_tokenizer(cfg.policy.tokenizer, trust_remote_code=cfg.policy.trust_remote_code)
    tokenization = TokenizationOptions.from_config(cfg)
    datasets = load_datasets(cfg.data)
    loaders = build_dataloaders(datasets, tokenizer, tokenization, cfg.data, cfg.sft, cfg.policy)
    preflight(cfg)
    fingerprint = data_fingerprint(cfg, tokenization, datasets.train, len(loaders.train.dataset))
    seed_driver_rngs(cfg.sft.seed)
    progress = SFTProgress()
    if resumed_from is not None:
        progress = _restore_driver_state(checkpointer, resumed_from, loaders.train, fingerprint)

    logger = Logger(cfg.logger, run_config=cfg.model_dump(mode="json"))
    init_ray(temp_dir=str(logger.run_dir / "ray"), num_cpus=_local_cpu_slots(cfg, device))
    cluster, policy = _start_workers(cfg, device, resumed_from)
    _log_parameter_counts(policy.parameter_counts, cfg.policy, logger, first_run=resumed_from is None)
    gpu_monitor = start_gpu_monitor(logger, cfg.logger.gpu_monitoring) if cfg.logger.monitor_gpus else None
    return SFTRun(
        cfg=cfg,
        tokenizer=tokenizer,
        train_dataloader=loaders.train,
        val_dataloader=loaders.validation,
        device=device,
        cluster=cluster,
        policy=policy,
        loss_fn=NLLLoss(),
        logger=logger,
        checkpointer=checkpointer,
        progress=progress,
        resumed_from=resumed_from,
        overlength_counts=loaders.overlength_counts,
        data_fingerprint=fingerprint,
        started_at=started_at,
        gpu_monitor=gpu_monitor,
    )


def check_import_paths(cfg: MasterConfig) -> None:
    """The classes and model options the workers would build from the config, resolved here in
    the driver so that a misspelt one is one ConfigError naming its key, not a worker traceback
    after Ray has started. (Dataset classes and processors are resolved by load_datasets, also
    before Ray.)"""
    policy = cfg.policy
    try:
        if policy.optimizer is not None:  # null with the Megatron backend (its own optimizer keys)
            check_optimizer_config(
                policy.optimizer, policy.scheduler_entries()[0], scheduler_is_list=isinstance(policy.scheduler, list)
            )
        if policy.hf_config_overrides:
            load_hf_config(policy.model_name, trust_remote_code=policy.trust_remote_code, overrides=policy.hf_config_overrides)
        if policy.dtensor_cfg.custom_parallel_plan is not None:
            import_parallel_plan(policy.dtensor_cfg.custom_parallel_plan)
        if policy.megatron_cfg.enabled:
            from nemo_rl.models.megatron.training_checks import check_megatron_policy

            check_megatron_policy(policy)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def validate(
    policy: Policy, val_dataloader: StatefulDataLoader, loss_fn: LossFn, *, val_batches: int, micro_batch_size: int
) -> dict[str, float]:
    """Token-weighted mean loss over the first `val_batches` batches (0 = all)."""
    loss_sum, tokens = 0.0, 0.0
    for batch_index, batch in enumerate(val_dataloader):
        if val_batches and batch_index >= val_batches:
            break
        result = policy.validate(batch, loss_fn, micro_batch_size=micro_batch_size)
        loss_sum += result["loss_sum"]
        tokens += result["num_valid_tokens"]
    return {"val_loss": loss_sum / tokens if tokens else float("nan"), "val_tokens": tokens}


def sft_train(run: SFTRun) -> dict[str, Any]:
    """The training loop: one global batch per step, validation and checkpoints on schedule.

    SIGTERM / SIGINT or `checkpointing.checkpoint_must_save_by` end it early, after the current
    step and a save. A dead worker restarts the workers from the last checkpoint, at most
    `cluster.max_restarts` times; past that the error ends the run, saying where to resume.
    """
    cfg = run.cfg
    total_steps = min(cfg.sft.max_num_steps, cfg.sft.max_num_epochs * len(run.train_dataloader))
    started, stop_reason = time.monotonic(), None

    with (
        ProgressReporter(total_steps=total_steps, start_step=run.progress.step) as reporter,
        StopRequests(then=_after_stop_text(cfg)) as stop,
        resume_hint_on_failure(run.checkpointer, run.resumed_from),
    ):
        if cfg.sft.val_at_start and run.progress.step == 0 and run.val_dataloader is not None:
            val_loss = _validate_and_log(run, step=0, reporter=reporter)["val_loss"]
            reporter.update(0, {"validation/val_loss": val_loss})

        while stop_reason is None and run.progress.step < total_steps and run.progress.epoch < cfg.sft.max_num_epochs:
            try:
                stop_reason = _train_epoch(run, reporter, stop, total_steps)
            except WorkerDiedError as failure:
                if stop.reason:  # the signal that stops the run ended the workers too (Slurm)
                    raise
                _restart_workers(run, failure)

        summary = _summarize(run, total_steps, time.monotonic() - started, stop_reason)
        reporter.summary(summary)
    return summary


def _train_epoch(run: SFTRun, reporter: ProgressReporter, stop: StopRequests, total_steps: int) -> str | None:
    """Steps through the rest of the current epoch; returns why it stopped early, if it did."""
    progress = run.progress
    run.train_dataloader.sampler.set_epoch(progress.epoch)  # the epoch's order (data/sampler.py)
    for batch in run.train_dataloader:
        _train_step(run, batch, reporter, total_steps)
        is_last = progress.step >= total_steps
        stop_reason = stop.reason or _deadline_reached(run)
        if run.cfg.checkpointing.enabled and (run.checkpointer.should_save(progress.step, is_last) or stop_reason):
            _save_checkpoint(run)
        if is_last:
            return None
        if stop_reason:
            return stop_reason
    progress.epoch += 1  # the loader was exhausted: a new epoch starts
    return None


def _train_step(run: SFTRun, batch, reporter: ProgressReporter, total_steps: int) -> None:
    """One optimizer step on the global `batch`, its metrics logged, then validation when due."""
    cfg, progress, timer = run.cfg, run.progress, Timer()
    with timer.time("total_step_time"):
        metrics = run.policy.train(batch, run.loss_fn)
    progress.step += 1
    progress.consumed_samples += cfg.policy.train_global_batch_size
    progress.skipped_updates += bool(metrics.get("update_skipped"))
    step_time = timer.get("total_step_time", "last")
    train_metrics = _train_metrics(metrics, step_time, run.cluster.world_size, on_gpu=run.cluster.use_gpus)
    train_metrics["train/skipped_updates"] = progress.skipped_updates
    run.logger.log_metrics(train_metrics, progress.step)
    progress.metrics.update(
        {f"train:{k.split('/', 1)[1]}": v for k, v in train_metrics.items() if k.startswith("train/")}
    )
    _stop_on_non_finite(metrics, progress.step, skip=cfg.sft.skip_non_finite_updates, reporter=reporter)

    is_last = progress.step >= total_steps
    val_due = cfg.sft.val_period and progress.step % cfg.sft.val_period == 0
    if run.val_dataloader is not None and (val_due or (is_last and cfg.sft.val_at_end)):
        train_metrics["validation/val_loss"] = _validate_and_log(run, step=progress.step, reporter=reporter)["val_loss"]
    reporter.update(progress.step, train_metrics)


def _restart_workers(run: SFTRun, failure: WorkerDiedError) -> None:
    """After a worker died: a new worker group from the last checkpoint, with the loader and the
    counters rewound to it (no sample lost or counted twice); re-raises past `max_restarts`."""
    max_restarts = run.cfg.cluster.max_restarts
    if run.restarts >= max_restarts:
        raise failure
    run.restarts += 1
    run.policy.shutdown()
    run.cluster.shutdown()
    if run.cfg.checkpointing.enabled:
        run.checkpointer.remove_incomplete()
    checkpoint = last_checkpoint(run.checkpointer, run.resumed_from)
    print(
        f"\n{failure.summary()} on node {failure.node_ip} ({failure.hostname}) died during step "
        f"{run.progress.step + 1}; restarting the workers ({run.restarts} of cluster.max_restarts="
        f"{max_restarts}) from {checkpoint or 'step 0'}",
        file=sys.stderr,
        flush=True,
    )
    if checkpoint is None:
        run.progress = _rewind_to_start(run)
    else:
        run.progress = _restore_driver_state(run.checkpointer, checkpoint, run.train_dataloader, run.data_fingerprint)
    run.cluster, run.policy = _start_workers(run.cfg, run.device, checkpoint)
    run.logger.log_metrics({"fault/worker_restarts": run.restarts}, run.progress.step)


def _summarize(run: SFTRun, total_steps: int, wall_time_s: float, stop_reason: str | None = None) -> dict[str, Any]:
    progress = run.progress
    overlength = {
        f"data/{split}_overlength_{kind}": count
        for split, counts in run.overlength_counts.items()
        for kind, count in counts.items()
    }
    run.logger.log_metrics(overlength, progress.step)

    summary = {
        "steps": progress.step,
        "total_steps": total_steps,
        "train_loss": progress.metrics.get("train:loss"),
        "val_loss": progress.metrics.get("val:val_loss"),
        "wall_time_s": wall_time_s,
        "checkpoint": str(run.checkpointer.get_latest_checkpoint_path() or ""),
        "log_dir": str(run.logger.run_dir),
        "resumed_from": str(run.resumed_from) if run.resumed_from else None,
        "stopped_early": f"on {stop_reason}; {resume_hint(run.checkpointer, run.resumed_from)}" if stop_reason else None,
        "skipped_updates": progress.skipped_updates or None,
        "worker_restarts": run.restarts or None,
    }
    summary["loss_curve"] = str(run.logger.finish() or "")
    return summary


# ---------------------------------------------------------------- helpers


def _train_metrics(metrics: dict[str, Any], step_time: float, world_size: int, *, on_gpu: bool) -> dict[str, float]:
    tokens_per_sec_per_worker = metrics["num_valid_tokens"] / step_time / world_size
    out = {
        "train/loss": metrics["loss"],
        "train/grad_norm": metrics["grad_norm"],
        "train/lr": metrics["lr"],
        "train/num_valid_tokens": metrics["num_valid_tokens"],
        "train/num_valid_samples": metrics["num_valid_samples"],
        "timing/train/total_step_time": step_time,
        "timing/train/valid_tokens_per_sec_per_worker": tokens_per_sec_per_worker,
        "timing/train/valid_tokens_per_sec": tokens_per_sec_per_worker * world_size,
        "memory/peak_gb_max": metrics["peak_memory_gb"],
    }
    if on_gpu:
        out["timing/train/valid_tokens_per_sec_per_gpu"] = tokens_per_sec_per_worker
    if "num_tokens" in metrics:  # all tokens of the samples with loss, prompts included
        out["timing/train/tokens_per_sec_per_worker"] = metrics["num_tokens"] / step_time / world_size
    model_flops_utilization = mfu(metrics.get("model_flops", 0.0), step_time, metrics.get("peak_flops"))
    if model_flops_utilization is not None:
        out["train/mfu"] = model_flops_utilization
    for rank, peak in enumerate(metrics.get("peak_memory_gb_per_worker", [])):
        out[f"memory/peak_gb_rank_{rank}"] = peak
    return out


def _validate_and_log(run: SFTRun, *, step: int, reporter: ProgressReporter) -> dict[str, float]:
    result = validate(
        run.policy,
        run.val_dataloader,
        run.loss_fn,
        val_batches=run.cfg.sft.val_batches,
        micro_batch_size=run.cfg.sft.val_micro_batch_size,
    )
    result.update(_val_generation_scores(run))
    run.logger.log_metrics(result, step, prefix="validation")
    run.progress.metrics.update({f"val:{k}": v for k, v in result.items()})
    _print_val_samples(run, step=step, reporter=reporter)
    return result


def _val_generation_scores(run: SFTRun) -> dict[str, float]:
    """sft.val_generation: EM/F1 or accuracy of greedy answers to the first N validation prompts."""
    gen_cfg = run.cfg.sft.val_generation
    if not gen_cfg.enabled or run.val_dataloader is None:
        return {}
    samples = first_val_samples(run.val_dataloader.dataset, run.tokenizer, gen_cfg.num_prompts)
    return score_val_generations(
        run.policy, samples, run.tokenizer, metric=gen_cfg.metric,
        max_total_sequence_length=run.cfg.policy.max_total_sequence_length, max_new_tokens=gen_cfg.max_new_tokens,
    )


def _print_val_samples(run: SFTRun, *, step: int, reporter: ProgressReporter) -> None:
    """logger.num_val_samples_to_print: the first N validation samples with the model's greedy
    continuation, above the progress line. N = 0 costs nothing."""
    num_samples = run.cfg.logger.num_val_samples_to_print
    if num_samples == 0 or run.val_dataloader is None:
        return
    samples = first_val_samples(run.val_dataloader.dataset, run.tokenizer, num_samples)
    print_val_samples(
        run.policy,
        samples,
        run.tokenizer,
        step=step,
        max_total_sequence_length=run.cfg.policy.max_total_sequence_length,
        print_fn=reporter.print,
    )


def _stop_on_non_finite(metrics: dict[str, Any], step: int, *, skip: bool, reporter: ProgressReporter) -> None:
    """The workers never apply a non-finite update; this stops the run, or says it went on."""
    if math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"]):
        return
    what = f"step {step}: loss={metrics['loss']} grad_norm={metrics['grad_norm']} is not finite"
    if skip:
        reporter.print(f"{what}; update skipped (sft.skip_non_finite_updates=true)")
        return
    raise FloatingPointError(
        f"{what}; the update was not applied and the run stops. Lower policy.optimizer.kwargs.lr or "
        "check the data; sft.skip_non_finite_updates=true skips such updates instead"
    )


def _deadline_reached(run: SFTRun) -> str | None:
    if run.checkpointer.deadline_reached(run.started_at):
        return f"checkpointing.checkpoint_must_save_by={run.cfg.checkpointing.checkpoint_must_save_by}"
    return None


def _after_stop_text(cfg: MasterConfig) -> str:
    return "saving a checkpoint and exiting" if cfg.checkpointing.enabled else "exiting (checkpointing is disabled)"


def _save_checkpoint(run: SFTRun) -> Path:
    progress = run.progress
    training_info = {
        "step": progress.step,
        "epoch": progress.epoch,
        "consumed_samples": progress.consumed_samples,
        "skipped_updates": progress.skipped_updates,
        "metrics": dict(progress.metrics),
        FINGERPRINT_KEY: run.data_fingerprint,
    }
    tmp_dir = run.checkpointer.init_tmp_checkpoint(progress.step, training_info, config_to_yaml(run.cfg))
    save_optimizer = run.cfg.checkpointing.save_optimizer
    run.policy.save_checkpoint(
        weights_path=str(tmp_dir / "policy" / "weights"),
        optimizer_path=str(tmp_dir / "policy" / "optimizer") if save_optimizer else None,
        hf_path=str(tmp_dir / "hf"),
        hf_merged_path=str(tmp_dir / "hf_merged") if _saves_merged(run.cfg) else None,
        hf_dtype=run.cfg.checkpointing.hf_dtype,
    )
    run.tokenizer.save_pretrained(tmp_dir / "hf")
    if _saves_merged(run.cfg):
        run.tokenizer.save_pretrained(tmp_dir / "hf_merged")
    save_driver_state(tmp_dir, run.train_dataloader)
    return run.checkpointer.finalize_checkpoint(tmp_dir)


def _saves_merged(cfg: MasterConfig) -> bool:
    """A LoRA run with checkpointing.save_merged also writes hf_merged/ (hf/ holds the adapter)."""
    return cfg.checkpointing.save_merged and cfg.policy.lora_enabled()


def _log_parameter_counts(counts: dict[str, int], policy_cfg: PolicyConfig, logger: Logger, *, first_run: bool) -> None:
    """Printed at every start; logged (params/trainable, params/total at step 0) once per run."""
    for line in describe_parameters(counts, policy_cfg.lora_settings()):
        print(line, flush=True)
    if first_run:
        logger.log_metrics({k: counts[k] for k in ("trainable", "total")}, 0, prefix="params")


def _restore_driver_state(
    checkpointer: CheckpointManager, path: Path, train_dataloader: StatefulDataLoader, fingerprint: dict[str, Any]
) -> SFTProgress:
    """Counters, loader position and driver RNGs from `path`, refused if the data order changed."""
    info = checkpointer.load_training_info(path)
    check_same_data_order(info.get(FINGERPRINT_KEY), fingerprint, path)
    load_driver_state(path, train_dataloader)
    return SFTProgress(
        step=info["step"],
        epoch=info["epoch"],
        consumed_samples=info["consumed_samples"],
        skipped_updates=info["skipped_updates"],
        metrics=dict(info["metrics"]),
    )


def _rewind_to_start(run: SFTRun) -> SFTProgress:
    """The driver's state of a fresh run (a restart before the first checkpoint)."""
    run.train_dataloader.load_state_dict({})
    seed_driver_rngs(run.cfg.sft.seed)
    return SFTProgress()


def _resolve_device(cfg: MasterConfig) -> Device:
    """`cluster.device` on this node, and the batch-split check that `device: auto` defers to it."""
    device = resolve_device(cfg.cluster.device)
    problem = batch_split_problem(cfg.policy, cfg.cluster.world_size(device))
    if problem:
        raise ConfigError(f"{problem} (cluster.device={cfg.cluster.device} resolved to {device})")
    return device


def _local_cpu_slots(cfg: MasterConfig, device: Device) -> int | None:
    """Logical CPUs for a local cluster of CPU workers: at least one per worker, so that a
    layout of more workers than cores (TP 2 x DP 2 on a 2-core laptop) still starts. Ignored
    when attaching to a running cluster; None (the machine's cores) on GPUs."""
    if device != "cpu":
        return None
    return max(os.cpu_count() or 1, cfg.cluster.world_size(device))


def _start_workers(cfg: MasterConfig, device: Device, checkpoint: Path | None) -> tuple[RayVirtualCluster, Policy]:
    """Reserves the slots and starts one policy worker in each, from `checkpoint` if given."""
    cluster = RayVirtualCluster(cfg.cluster.num_nodes, cfg.cluster.workers_per_node(device), use_gpus=device == "cuda")
    try:
        policy = Policy(
            cluster,
            cfg.policy,
            seed=cfg.sft.seed,
            weights_path=str(checkpoint / "policy" / "weights") if checkpoint else None,
            optimizer_path=_optimizer_path_if_saved(checkpoint),
        )
    except BaseException:
        cluster.shutdown()
        raise
    print(f"policy workers: {policy.worker_group.describe()}", flush=True)
    return cluster, policy


def _optimizer_path_if_saved(checkpoint: Path | None) -> str | None:
    if checkpoint is None:
        return None
    optimizer_dir = checkpoint / "policy" / "optimizer"
    return str(optimizer_dir) if optimizer_dir.exists() else None
