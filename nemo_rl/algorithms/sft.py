"""Supervised fine-tuning: setup, validate, train.

The driver owns the data loaders, logging and checkpoint bookkeeping; the policy workers
own the model shards. Each function here reads top to bottom and calls the rest by name.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from nemo_rl.config import MasterConfig, config_to_yaml
from nemo_rl.data.collate import sft_collate
from nemo_rl.data.datasets import load_datasets
from nemo_rl.data.processors import SFTDataset
from nemo_rl.data.tokenizer import get_tokenizer
from nemo_rl.distributed import RayVirtualCluster, init_ray, shutdown_ray
from nemo_rl.models.policy import Policy
from nemo_rl.utils.checkpoint import CheckpointManager
from nemo_rl.utils.logger import Logger
from nemo_rl.utils.progress import ProgressReporter
from nemo_rl.utils.timer import Timer


@dataclass
class SFTProgress:
    """The driver's training state; it is what `training_info.json` records."""

    step: int = 0
    epoch: int = 0
    consumed_samples: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class SFTRun:
    cfg: MasterConfig
    tokenizer: Any
    train_dataloader: StatefulDataLoader
    val_dataloader: StatefulDataLoader | None
    cluster: RayVirtualCluster
    policy: Policy
    logger: Logger
    checkpointer: CheckpointManager
    progress: SFTProgress
    resumed_from: Path | None
    overlength_counts: dict[str, dict[str, int]]

    def shutdown(self) -> None:
        self.policy.shutdown()
        self.cluster.shutdown()
        shutdown_ray()


def setup(cfg: MasterConfig) -> SFTRun:
    """Data first (bad data fails before any worker starts), then Ray, then the policy."""
    tokenizer = get_tokenizer(cfg.policy.tokenizer, trust_remote_code=cfg.policy.trust_remote_code)
    datasets = load_datasets(cfg.data)
    make_dataset = partial(
        SFTDataset,
        tokenizer=tokenizer,
        task_spec=datasets.task_spec,
        max_seq_length=cfg.data.max_input_seq_length,
        add_bos=cfg.data.add_bos,
        add_eos=cfg.data.add_eos,
        add_generation_prompt=cfg.data.add_generation_prompt,
        only_unmask_final=cfg.sft.only_unmask_final,
        overlength=cfg.data.overlength,
        chat_template_kwargs=cfg.policy.tokenizer.chat_template_kwargs,
    )
    train_dataset = make_dataset(datasets.train, source="train")
    val_dataset = None
    if datasets.validation is not None:
        val_task_spec = datasets.validation_task_spec or datasets.task_spec
        val_dataset = make_dataset(datasets.validation, source="validation", task_spec=val_task_spec)
    overlength_counts = {"train": train_dataset.overlength_counts}
    if val_dataset is not None:
        overlength_counts["validation"] = val_dataset.overlength_counts

    collate = partial(
        sft_collate,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        make_sequence_length_divisible_by=cfg.policy.make_sequence_length_divisible_by,
    )
    train_dataloader = _train_dataloader(train_dataset, collate, cfg)
    val_dataloader = None
    if val_dataset is not None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*set_vital.*")
            val_dataloader = StatefulDataLoader(
                val_dataset, batch_size=cfg.sft.val_global_batch_size, shuffle=False, collate_fn=collate
            )
    if len(train_dataloader) == 0:
        raise ValueError(
            f"the training set has {len(train_dataset)} samples, fewer than one global batch "
            f"(policy.train_global_batch_size={cfg.policy.train_global_batch_size})"
        )

    checkpointer = CheckpointManager(cfg.checkpointing)
    progress, resumed_from = SFTProgress(), None
    if cfg.checkpointing.enabled:
        checkpointer.remove_incomplete()
        resumed_from = checkpointer.get_latest_checkpoint_path()
    if resumed_from is not None:
        progress = _restore_driver_state(checkpointer, resumed_from, train_dataloader)

    logger = Logger(cfg.logger, run_config=cfg.model_dump(mode="json"))
    init_ray(temp_dir=str(logger.run_dir / "ray"))
    device = cfg.cluster.resolved_device()
    cluster = RayVirtualCluster(
        cfg.cluster.num_nodes, cfg.cluster.workers_per_node(), use_gpus=device == "cuda"
    )
    policy = Policy(
        cluster,
        cfg.policy,
        seed=cfg.sft.seed,
        weights_path=str(resumed_from / "policy" / "weights") if resumed_from else None,
        optimizer_path=_optimizer_path_if_saved(resumed_from),
    )
    return SFTRun(
        cfg, tokenizer, train_dataloader, val_dataloader, cluster, policy, logger, checkpointer,
        progress, resumed_from, overlength_counts,
    )


def validate(policy: Policy, val_dataloader: StatefulDataLoader, *, val_batches: int, micro_batch_size: int) -> dict[str, float]:
    """Token-weighted mean NLL over the first `val_batches` batches (0 = all)."""
    loss_sum, tokens = 0.0, 0.0
    for batch_index, batch in enumerate(val_dataloader):
        if val_batches and batch_index >= val_batches:
            break
        result = policy.validate(batch, micro_batch_size=micro_batch_size)
        loss_sum += result["loss"] * result["num_valid_tokens"]
        tokens += result["num_valid_tokens"]
    return {"val_loss": loss_sum / tokens if tokens else float("nan"), "val_tokens": tokens}


def sft_train(run: SFTRun) -> dict[str, Any]:
    """The training loop: one global batch per step, validation and checkpoints on schedule."""
    cfg, policy, progress = run.cfg, run.policy, run.progress
    total_steps = min(cfg.sft.max_num_steps, cfg.sft.max_num_epochs * len(run.train_dataloader))
    timer = Timer()
    world_size = run.cluster.world_size
    last_val: dict[str, float] = {}
    started = time.monotonic()

    with ProgressReporter(total_steps=total_steps, start_step=progress.step) as reporter:
        if cfg.sft.val_at_start and progress.step == 0 and run.val_dataloader is not None:
            last_val = _validate_and_log(run, step=0)
            reporter.update(0, {"validation/val_loss": last_val["val_loss"]})

        while progress.step < total_steps and progress.epoch < cfg.sft.max_num_epochs:
            for batch in run.train_dataloader:
                with timer.time("total_step_time"):
                    metrics = policy.train(batch)
                progress.step += 1
                progress.consumed_samples += cfg.policy.train_global_batch_size
                step_time = timer.get("total_step_time", "last")
                train_metrics = _train_metrics(metrics, step_time, world_size, on_gpu=run.cluster.use_gpus)
                run.logger.log_metrics(train_metrics, progress.step)
                progress.metrics.update(
                    {f"train:{k.split('/', 1)[1]}": v for k, v in train_metrics.items() if k.startswith("train/")}
                )
                _stop_on_non_finite(metrics, progress.step)

                is_last = progress.step >= total_steps
                val_due = cfg.sft.val_period and progress.step % cfg.sft.val_period == 0
                if run.val_dataloader is not None and (val_due or (is_last and cfg.sft.val_at_end)):
                    last_val = _validate_and_log(run, step=progress.step)
                    train_metrics["validation/val_loss"] = last_val["val_loss"]
                reporter.update(progress.step, train_metrics)
                if cfg.checkpointing.enabled and run.checkpointer.should_save(progress.step, is_last):
                    _save_checkpoint(run)
                if is_last:
                    break
            else:
                progress.epoch += 1  # the loader was exhausted: a new epoch starts

        summary = _summarize(run, total_steps, last_val, time.monotonic() - started)
        reporter.summary(summary)
    return summary


def _summarize(run: SFTRun, total_steps: int, last_val: dict[str, float], wall_time_s: float) -> dict[str, Any]:
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
        "val_loss": last_val.get("val_loss", progress.metrics.get("val:val_loss")),
        "wall_time_s": wall_time_s,
        "checkpoint": str(run.checkpointer.get_latest_checkpoint_path() or ""),
        "log_dir": str(run.logger.run_dir),
        "resumed_from": str(run.resumed_from) if run.resumed_from else None,
    }
    summary["loss_curve"] = str(run.logger.finish() or "")
    return summary


# ---------------------------------------------------------------- helpers


def _train_dataloader(dataset: SFTDataset, collate, cfg: MasterConfig) -> StatefulDataLoader:
    generator = torch.Generator()
    generator.manual_seed(cfg.sft.seed)
    with warnings.catch_warnings():  # torchdata calls a torch API it deprecated itself
        warnings.filterwarnings("ignore", message=".*set_vital.*")
        return StatefulDataLoader(
            dataset,
            batch_size=cfg.policy.train_global_batch_size,
            shuffle=cfg.data.shuffle,
            generator=generator,
            collate_fn=collate,
            drop_last=True,  # every step sees a full global batch, so the update size is fixed
            num_workers=cfg.data.num_workers,
        )


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
    for rank, peak in enumerate(metrics.get("peak_memory_gb_per_worker", [])):
        out[f"memory/peak_gb_rank_{rank}"] = peak
    return out


def _validate_and_log(run: SFTRun, *, step: int) -> dict[str, float]:
    result = validate(
        run.policy,
        run.val_dataloader,
        val_batches=run.cfg.sft.val_batches,
        micro_batch_size=run.cfg.sft.val_micro_batch_size,
    )
    run.logger.log_metrics(result, step, prefix="validation")
    run.progress.metrics.update({f"val:{k}": v for k, v in result.items()})
    return result


def _stop_on_non_finite(metrics: dict[str, Any], step: int) -> None:
    if not math.isfinite(metrics["loss"]) or not math.isfinite(metrics["grad_norm"]):
        raise FloatingPointError(
            f"step {step}: loss={metrics['loss']} grad_norm={metrics['grad_norm']} is not finite; "
            "lower policy.optimizer.kwargs.lr or check the data"
        )


def _save_checkpoint(run: SFTRun) -> Path:
    progress = run.progress
    training_info = {
        "step": progress.step,
        "epoch": progress.epoch,
        "consumed_samples": progress.consumed_samples,
        "metrics": dict(progress.metrics),
    }
    tmp_dir = run.checkpointer.init_tmp_checkpoint(progress.step, training_info, config_to_yaml(run.cfg))
    save_optimizer = run.cfg.checkpointing.save_optimizer
    run.policy.save_checkpoint(
        weights_path=str(tmp_dir / "policy" / "weights"),
        optimizer_path=str(tmp_dir / "policy" / "optimizer") if save_optimizer else None,
        hf_path=str(tmp_dir / "hf"),
    )
    run.tokenizer.save_pretrained(tmp_dir / "hf")
    torch.save(run.train_dataloader.state_dict(), tmp_dir / "train_dataloader.pt")
    return run.checkpointer.finalize_checkpoint(tmp_dir)


def _restore_driver_state(checkpointer: CheckpointManager, path: Path, train_dataloader: StatefulDataLoader) -> SFTProgress:
    info = checkpointer.load_training_info(path)
    train_dataloader.load_state_dict(torch.load(path / "train_dataloader.pt", weights_only=False))
    return SFTProgress(
        step=info["step"],
        epoch=info["epoch"],
        consumed_samples=info["consumed_samples"],
        metrics=dict(info.get("metrics", {})),
    )


def _optimizer_path_if_saved(checkpoint: Path | None) -> str | None:
    if checkpoint is None:
        return None
    optimizer_dir = checkpoint / "policy" / "optimizer"
    return str(optimizer_dir) if optimizer_dir.exists() else None
