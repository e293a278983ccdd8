"""Metric logging: a JSONL file always; TensorBoard, W&B, MLflow and SwanLab when enabled.

Each run gets its own directory `<logger.log_dir>/exp_<NNN>/` (the next free number, as
in NeMo RL), exposed as `Logger.run_dir`; nothing from an earlier run is overwritten.

    <run_dir>/metrics.jsonl    one JSON object per log_metrics call:
                               {"step": 12, "train/loss": 2.31, "train/lr": 0.001, ...}
                               non-finite values (nan, inf) are written as null
    <run_dir>/config.yaml      the run's config (log_hyperparams)
    <run_dir>/<tensorboard.log_dir>/   TensorBoard event files
    <run_dir>/wandb/           W&B run files (online or WANDB_MODE=offline)
    <run_dir>/mlruns/          MLflow store when mlflow.tracking_uri is unset
    <run_dir>/swanlog/         SwanLab's files (logger.swanlab_enabled)
    <run_dir>/loss_curve.png   train and validation loss vs step, written by finish()

Backends are imported only when enabled. See docs/logging.md.

`log_metrics` may be called from more than one thread (the GPU monitor writes from its own):
a lock keeps every record whole and every backend's steps in order.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from nemo_rl.config.schema import LoggerConfig

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
LOSS_CURVE_FILE = "loss_curve.png"
TRAIN_LOSS = "train/loss"
VAL_LOSS = "validation/val_loss"

_EXP_RE = re.compile(r"exp_(\d+)")


def peek_next_experiment_dir(base_log_dir: str | Path) -> Path:
    """The `<base_log_dir>/exp_<NNN>` the next Logger will create (creates nothing)."""
    base = Path(base_log_dir)
    taken = (
        [int(m.group(1)) for p in base.iterdir() if (m := _EXP_RE.fullmatch(p.name))]
        if base.is_dir()
        else []
    )
    return base / f"exp_{max(taken, default=0) + 1:03d}"


def get_next_experiment_dir(base_log_dir: str | Path) -> Path:
    """Create and return `<base_log_dir>/exp_<NNN>` with the next free number (exp_001 first)."""
    base = Path(base_log_dir)
    base.mkdir(parents=True, exist_ok=True)
    number = int(peek_next_experiment_dir(base).name[len("exp_") :])
    while True:  # mkdir claims the name atomically, even against a concurrent run
        run_dir = base / f"exp_{number:03d}"
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            number += 1


class Logger:
    """Writes every metric to `<run_dir>/metrics.jsonl` and to the enabled backends."""

    def __init__(self, cfg: LoggerConfig, run_config: dict | None = None):
        self.cfg = cfg
        self.run_dir = get_next_experiment_dir(cfg.log_dir)
        self.metrics_path = self.run_dir / METRICS_FILE
        self._jsonl = self.metrics_path.open("a", encoding="utf-8")
        self._finished = False
        self._loss_curve: Path | None = None
        self._lock = threading.Lock()
        self._latest_step = 0
        self._before_finish: list[Callable[[], None]] = []

        self._tb = None
        if cfg.tensorboard_enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.run_dir / cfg.tensorboard.log_dir))

        self._wandb_run = None
        if cfg.wandb_enabled:
            import wandb

            self._wandb_run = wandb.init(
                project=cfg.wandb.project,
                name=cfg.wandb.name,
                entity=cfg.wandb.entity,
                dir=str(self.run_dir),
                config=_plain(run_config) if run_config else None,
            )

        self._mlflow = None
        if cfg.mlflow_enabled:
            self._mlflow = _MLflowRun(cfg, self.run_dir)

        self._swanlab = None
        if cfg.swanlab_enabled:
            self._swanlab = _start_swanlab_run(cfg, self.run_dir, _plain(run_config) if run_config else None)

        if run_config is not None:
            self.log_hyperparams(run_config)

    def log_metrics(self, metrics: Mapping[str, Any], step: int, prefix: str = "") -> None:
        """Log `metrics` at `step`; names become `<prefix>/<name>` when a prefix is given.

        An empty `metrics` writes nothing.
        """
        with self._lock:
            self._write(metrics, step, prefix)

    def log_system_metrics(self, metrics: Mapping[str, Any]) -> None:
        """Log background samples (the GPU monitor's) at the latest step logged so far.

        Their own clock is not the training step; taking the latest step keeps every backend's
        steps in order (W&B drops a step lower than one it has seen). After `finish` they are
        dropped: the files are closed.
        """
        with self._lock:
            if not self._finished:
                self._write(metrics, self._latest_step, "")

    def before_finish(self, callback: Callable[[], None]) -> None:
        """Call `callback` at the start of `finish`, while the files are still open (a background
        sampler writes its last samples there)."""
        self._before_finish.append(callback)

    def _write(self, metrics: Mapping[str, Any], step: int, prefix: str) -> None:
        if not metrics:
            return
        named: dict[str, float | int | None] = {}
        for key, value in metrics.items():
            name = f"{prefix}/{key}" if prefix else key
            named[name] = _number(name, value)

        record = {"step": step, **named}
        self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        self._jsonl.flush()
        self._latest_step = max(self._latest_step, step)

        # backends get floats; None (non-finite in JSONL) goes to them as nan
        values = {k: float("nan") if v is None else float(v) for k, v in named.items()}
        if self._tb is not None:
            for name, value in values.items():
                self._tb.add_scalar(name, value, step)
        if self._wandb_run is not None:
            self._wandb_run.log(values, step=step)
        if self._mlflow is not None:
            self._mlflow.log_metrics(values, step)
        if self._swanlab is not None:
            self._swanlab.log(values, step=step)

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        """Write `<run_dir>/config.yaml` and hand the config to the enabled backends."""
        import yaml

        plain = _plain(params)
        text = yaml.safe_dump(plain, sort_keys=False)
        (self.run_dir / "config.yaml").write_text(text)
        if self._tb is not None:
            indented = "\n".join("    " + line for line in text.splitlines())
            self._tb.add_text("config", indented, 0)
        if self._wandb_run is not None:
            self._wandb_run.config.update(plain, allow_val_change=True)
        if self._mlflow is not None:
            self._mlflow.log_params(plain, text)

    def finish(self) -> Path | None:
        """Close the backends, write `<run_dir>/loss_curve.png` and return its path.

        None when no loss was logged. Calling it again returns the same path.
        """
        if self._finished:
            return self._loss_curve
        callbacks, self._before_finish = self._before_finish, []
        for callback in callbacks:  # outside the lock: they may log
            callback()
        with self._lock:
            self._finished = True
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb_run is not None:
            self._wandb_run.finish()
        if self._mlflow is not None:
            self._mlflow.finish()
        if self._swanlab is not None:
            self._swanlab.finish()
        self._loss_curve = plot_loss_curve(self.metrics_path, self.run_dir / LOSS_CURVE_FILE)
        return self._loss_curve


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a torn last line (a crash mid-write) is skipped."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_loss_curve(metrics_path: str | Path, out_path: str | Path) -> Path | None:
    """Plot train/loss and validation/val_loss vs step from a metrics.jsonl into a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_metrics(metrics_path)
    series = {
        label: [(r["step"], r[name]) for r in records if r.get(name) is not None]
        for label, name in (("train loss", TRAIN_LOSS), ("validation loss", VAL_LOSS))
    }
    if not any(series.values()):
        return None

    # Figure + Agg canvas directly: no pyplot global state, no display needed.
    fig = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for (label, points), style in zip(series.items(), ("-", "o-")):
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, style, label=label, markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(Path(metrics_path).parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path)
    return out_path


# ---------------------------------------------------------------- MLflow


class _MLflowRun:
    """One MLflow run through MlflowClient (no global active-run state)."""

    # MLflow's limits: 100 params per batch call, 6000 characters per value
    _PARAM_BATCH = 100
    _PARAM_MAX_LEN = 6000

    def __init__(self, cfg: LoggerConfig, run_dir: Path):
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise ImportError(
                "logger.mlflow_enabled=true but mlflow is not installed; install the extra "
                "with `uv sync --extra mlflow`, or set logger.mlflow_enabled=false"
            ) from None
        artifact_location = None
        tracking_uri = cfg.mlflow.tracking_uri
        if tracking_uri is None:
            # MLflow 3 refuses its plain file store by default; a SQLite file is as local.
            store = run_dir / "mlruns"
            store.mkdir(exist_ok=True)
            tracking_uri = f"sqlite:///{store.resolve() / 'mlflow.db'}"
            artifact_location = (store / "artifacts").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=tracking_uri)
        experiment = self.client.get_experiment_by_name(cfg.mlflow.experiment_name)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else self.client.create_experiment(
                cfg.mlflow.experiment_name, artifact_location=artifact_location
            )
        )
        run = self.client.create_run(experiment_id, run_name=cfg.mlflow.run_name or run_dir.name)
        self.run_id = run.info.run_id
        self.tracking_uri = tracking_uri

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        metrics = [Metric(name, value, now_ms, step) for name, value in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def log_params(self, params: dict, config_text: str) -> None:
        from mlflow.entities import Param

        flat = [
            Param(key[:250], str(value)[: self._PARAM_MAX_LEN])
            for key, value in _flatten(params).items()
        ]
        for start in range(0, len(flat), self._PARAM_BATCH):
            self.client.log_batch(self.run_id, params=flat[start : start + self._PARAM_BATCH])
        self.client.log_text(self.run_id, config_text, "config.yaml")

    def finish(self) -> None:
        self.client.set_terminated(self.run_id)


# ---------------------------------------------------------------- SwanLab


def _start_swanlab_run(cfg: LoggerConfig, run_dir: Path, config: dict | None) -> Any:
    """A SwanLab run (`.log(values, step=)`, `.finish()`), its files under <run_dir>/swanlog."""
    try:
        import swanlab
    except ImportError:
        raise ImportError(
            "logger.swanlab_enabled=true but swanlab is not installed; install the extra "
            "with `uv sync --extra swanlab`, or set logger.swanlab_enabled=false"
        ) from None
    return swanlab.init(
        project=cfg.swanlab.project,
        name=cfg.swanlab.name or run_dir.name,
        log_dir=str(run_dir / "swanlog"),
        mode=cfg.swanlab.mode,
        config=config,
        reinit=True,
    )


# ---------------------------------------------------------------- helpers


def _number(name: str, value: Any) -> float | int | None:
    """A metric value as a JSON number; None for nan/inf."""
    if hasattr(value, "item"):  # numpy / torch scalars
        value = value.item()
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    raise TypeError(
        f"metric {name!r} has a value of type {type(value).__name__}: {value!r}; "
        f"log_metrics takes numbers only"
    )


def _plain(params: Mapping[str, Any]) -> dict:
    """A JSON/YAML-safe copy (paths, enums and other objects become strings)."""
    return json.loads(json.dumps(dict(params), default=str))


def _flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, name))
        else:
            flat[name] = value
    return flat
