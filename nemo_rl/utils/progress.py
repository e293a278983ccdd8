"""The live progress line and the end-of-run summary.

    print_run_header(cfg, config_path, device="cpu", resumes_from=None)   # what runs, where things go
    with ProgressReporter(total_steps=150, start_step=resumed_step) as progress:
        for step in ...:
            progress.update(step, {"train/loss": 2.314, "train/lr": 1e-3, ...})
        progress.summary({"checkpoint": ..., "log_dir": logger.run_dir, ...})

prints `step 12/150 | loss 2.314 | val 2.401 | lr 1.0e-03 | 5.2k tok/s | ETA 1m10s`.
On a terminal the line refreshes in place (rich Live; other prints scroll above it). When
the output is not a terminal (CI logs, `> file`, Slurm) each update is one plain line,
at most one every `min_interval_s` seconds, with no control characters or colors.

`update` reads the names the SFT loop logs (bare names also work):
    train/loss, validation/val_loss, train/lr,
    train/num_valid_tokens / timing/train/total_step_time -> tok/s (all workers together)
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from rich import box
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from nemo_rl.config.schema import MasterConfig


class ProgressReporter:
    def __init__(
        self,
        total_steps: int,
        *,
        start_step: int = 0,
        file: TextIO | None = None,
        live: bool | None = None,
        min_interval_s: float = 0.0,
    ):
        """`start_step`: steps already done (a resumed run), so the ETA counts only new ones.
        `live`: refresh one line in place; default: whether `file` is a terminal.
        `min_interval_s`: in plain mode, the least time between two printed lines (the first
        and the last step are always printed)."""
        self.total_steps = total_steps
        self.start_step = start_step
        self.min_interval_s = min_interval_s
        file = file if file is not None else sys.stdout
        self.live = _isatty(file) if live is None else live
        self.console = _console(file, self.live)
        self._live: Live | None = None
        self._t0 = time.monotonic()
        self._last_print = -math.inf
        self.step = start_step
        self.last_loss: float | None = None
        self.last_val_loss: float | None = None
        self.last_lr: float | None = None
        self.last_tokens_per_s: float | None = None

    # ------------------------------------------------------------ progress line

    def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
        """Record `step` (finished steps, 1-based) and its metrics, and show the line."""
        self.step = step
        metrics = metrics or {}
        loss = _lookup(metrics, "train/loss", "loss")
        val_loss = _lookup(metrics, "validation/val_loss", "val_loss")
        lr = _lookup(metrics, "train/lr", "lr")
        tokens = _lookup(metrics, "train/num_valid_tokens", "num_valid_tokens")
        step_time = _lookup(metrics, "timing/train/total_step_time", "total_step_time")
        self.last_loss = loss if loss is not None else self.last_loss
        self.last_val_loss = val_loss if val_loss is not None else self.last_val_loss
        self.last_lr = lr if lr is not None else self.last_lr
        if tokens is not None and step_time:
            self.last_tokens_per_s = tokens / step_time

        line = self.format_line()
        if self.live:
            if self._live is None:
                self._live = Live(
                    Text(line), console=self.console, refresh_per_second=4, transient=False,
                    redirect_stdout=True, redirect_stderr=True,
                )
                self._live.start()
            else:
                self._live.update(Text(line))
            return
        now = time.monotonic()
        first = self._last_print == -math.inf
        if first or step >= self.total_steps or now - self._last_print >= self.min_interval_s:
            self._write_plain(line)
            self._last_print = now

    def format_line(self) -> str:
        parts = [f"step {self.step}/{self.total_steps}"]
        if self.last_loss is not None:
            parts.append(f"loss {_float(self.last_loss)}")
        if self.last_val_loss is not None:
            parts.append(f"val {_float(self.last_val_loss)}")
        if self.last_lr is not None:
            parts.append(f"lr {self.last_lr:.1e}")
        if self.last_tokens_per_s is not None:
            parts.append(f"{_si(self.last_tokens_per_s)} tok/s")
        eta = self.eta_s()
        if eta is not None:
            parts.append(f"ETA {format_duration(eta)}")
        return " | ".join(parts)

    def eta_s(self) -> float | None:
        """Seconds left at the mean pace of the steps run so far (None before the first)."""
        done = self.step - self.start_step
        if done <= 0:
            return None
        pace = (time.monotonic() - self._t0) / done
        return max(self.total_steps - self.step, 0) * pace

    def print(self, message: str) -> None:
        """A message that scrolls above the live line (or a plain line)."""
        if self.live:
            self.console.print(message, markup=False, highlight=False)
        else:
            self._write_plain(message)

    def close(self) -> None:
        """Stop refreshing; the last line stays on screen."""
        if self._live is not None:
            self._live.stop()
            self._live = None

    def __enter__(self) -> ProgressReporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ summary

    def summary(self, results: Mapping[str, Any] | None = None) -> None:
        """Print the end-of-run table from `results`, the dict the training loop returns.

        Known keys (each optional; the first four default to what `update` saw):
        steps, total_steps, train_loss, val_loss, wall_time_s, checkpoint, model,
        log_dir, loss_curve, resumed_from. `model` defaults to `<checkpoint>/hf` when
        that exists. Other keys are shown as they are; None and "" values are left out.
        """
        self.close()
        results = dict(results or {})
        steps = _first(results.pop("steps", None), self.step)
        total = _first(results.pop("total_steps", None), self.total_steps)
        train_loss = _first(results.pop("train_loss", None), self.last_loss)
        val_loss = _first(results.pop("val_loss", None), self.last_val_loss)
        wall = _first(results.pop("wall_time_s", None), time.monotonic() - self._t0)
        checkpoint = results.pop("checkpoint", None) or None
        model = results.pop("model", None) or None
        if model is None and checkpoint is not None and (Path(checkpoint) / "hf").is_dir():
            model = Path(checkpoint) / "hf"

        rows: list[tuple[str, Any]] = [
            ("steps", f"{steps}/{total}"),
            ("final train loss", _float(train_loss)),
            ("final val loss", _float(val_loss)),
            ("wall time", format_duration(wall)),
            ("checkpoint", checkpoint),
            ("model (HF)", model),
        ]
        labels = {"log_dir": "logs", "loss_curve": "loss curve", "resumed_from": "resumed from"}
        rows += [(labels.get(key, key), value) for key, value in results.items()]

        table = Table(
            title="run summary", show_header=False, title_justify="left",
            box=box.ROUNDED if self.live else box.ASCII,
        )
        table.add_column(style="bold" if self.live else None)
        table.add_column(overflow="fold")
        for label, value in rows:
            if value is None or value == "":
                continue
            table.add_row(label, _float(value) if isinstance(value, float) else str(value))
        self.console.print(table)

    def _write_plain(self, line: str) -> None:
        file = self.console.file
        file.write(line + "\n")
        file.flush()


# ---------------------------------------------------------------- run header


def _describe_datasets(datasets, unnamed: str) -> str:
    """`squad`, or for a mixture `OpenMathInstruct-2 (max 1000) + tulu3_sft_mixture`."""
    if not isinstance(datasets, list):
        return datasets.dataset_name or datasets.data_path or unnamed
    names = []
    for dataset in datasets:
        name = dataset.dataset_name or dataset.data_path or unnamed
        names.append(f"{name} (max {dataset.max_samples})" if dataset.max_samples is not None else name)
    return " + ".join(names)


def print_run_header(
    cfg: MasterConfig,
    config_path: str | Path | None = None,
    *,
    device: str,
    resumes_from: Path | None,
    file: TextIO | None = None,
) -> None:
    """Print what is about to run and where its checkpoints and logs go (before Ray starts).

    `device` is the resolved `cluster.device`; `resumes_from` the checkpoint the run will
    actually start from (what `checkpointing.resume` selected), None for a fresh start."""
    from nemo_rl.utils.logger import peek_next_experiment_dir

    file = file if file is not None else sys.stdout
    console = _console(file, _isatty(file))
    policy, sft, cluster = cfg.policy, cfg.sft, cfg.cluster
    data = _describe_datasets(cfg.data.train, "?")
    if cfg.data.validation is not None:
        data += f" (validation: {_describe_datasets(cfg.data.validation, 'split from train')})"
    workers = cluster.workers_per_node(device)
    lora = " + LoRA" if policy.lora_enabled() else ""

    rows: list[tuple[str, str]] = [
        ("model", f"{policy.model_name} ({policy.precision}{lora})"),
        ("data", data),
        (
            "schedule",
            f"{sft.max_num_steps} steps max, {sft.max_num_epochs} epoch(s) max, "
            f"global batch {policy.train_global_batch_size}, "
            f"micro-batch {policy.train_micro_batch_size}",
        ),
        ("cluster", f"{cluster.num_nodes} node(s) x {workers} {device} worker(s)"),
    ]
    ckpt = cfg.checkpointing
    if ckpt.enabled:
        keep = "all kept" if ckpt.keep_top_k is None else f"keep top {ckpt.keep_top_k}"
        if ckpt.keep_top_k is not None and ckpt.metric_name is not None:
            keep += f" by {ckpt.metric_name}"
        every = f"every {ckpt.save_period} steps"
        rows.append(("checkpoints", f"{ckpt.checkpoint_dir} ({every}, {keep})"))
    else:
        rows.append(("checkpoints", "off (checkpointing.enabled=false)"))
    if resumes_from is not None:
        rows.append(("resumes from", str(resumes_from)))
    backends = [
        name
        for name, on in (
            ("tensorboard", cfg.logger.tensorboard_enabled),
            ("wandb", cfg.logger.wandb_enabled),
            ("mlflow", cfg.logger.mlflow_enabled),
        )
        if on
    ]
    logs = str(peek_next_experiment_dir(cfg.logger.log_dir))
    rows.append(("logs", logs + (f" (+ {', '.join(backends)})" if backends else "")))

    table = Table(
        title=f"SFT run: {config_path}" if config_path else "SFT run",
        show_header=False, title_justify="left", box=None if console.is_terminal else box.ASCII,
    )
    table.add_column(style="bold" if console.is_terminal else None)
    table.add_column(overflow="fold")
    for label, value in rows:
        table.add_row(label, value)
    console.print(table)


# ---------------------------------------------------------------- formatting


def format_duration(seconds: float) -> str:
    """45s, 1m10s, 2h03m, 1d04h."""
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"


def _si(value: float) -> str:
    """5200 -> 5.2k, 1.3e6 -> 1.3M."""
    for threshold, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= threshold:
            return f"{value / threshold:.1f}{suffix}"
    return f"{value:.0f}"


def _float(value: Any) -> str:
    if value is None:
        return "-"
    value = float(value)
    if not math.isfinite(value):
        return str(value)
    return f"{value:.3f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


def _lookup(metrics: Mapping[str, Any], *names: str) -> float | None:
    for name in names:
        value = metrics.get(name)
        if value is not None:
            return float(value.item() if hasattr(value, "item") else value)
    return None


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _console(file: TextIO, live: bool) -> Console:
    if live:
        return Console(file=file)
    # never an escape code, whatever FORCE_COLOR and friends say
    return Console(
        file=file, force_terminal=False, force_interactive=False, no_color=True,
        highlight=False, width=100,
    )


def _isatty(file: TextIO) -> bool:
    try:
        return file.isatty()
    except (AttributeError, ValueError):
        return False
