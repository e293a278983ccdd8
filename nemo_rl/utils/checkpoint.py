"""Driver-side checkpoint bookkeeping: temporary dirs, the atomic rename, keep_top_k, resume.

A checkpoint is visible only as `<checkpoint_dir>/step_<N>/`, and such a directory is
always complete: everything is written into `tmp_step_<N>/` first and the driver renames
it once, after every file is on disk. A crash during a save leaves a `tmp_step_<N>/`
behind, which is never listed as a checkpoint and is deleted by `remove_incomplete()`.

training_info.json, the one layout (see docs/checkpointing.md):

    {"step": 120, "epoch": 1, "consumed_samples": 3840, "skipped_updates": 0,
     "metrics": {"val:val_loss": 1.93, "train:loss": 2.01, ...}, "data_fingerprint": {...}}

`metrics` keys are `checkpointing.metric_name` strings: `val:<name>` for a validation
metric, `train:<name>` for a training metric; build them with `checkpoint_metrics()`.
Non-finite metric values are stored as null and rank as missing.

This module holds no model state and imports nothing of ours but `nemo_rl.config`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nemo_rl.config.schema import CheckpointingConfig

log = logging.getLogger(__name__)

TRAINING_INFO = "training_info.json"
RUN_CONFIG = "config.yaml"

_STEP_RE = re.compile(r"step_(\d+)")
_TMP_PREFIX = "tmp_step_"
# where finalize_checkpoint parks an existing step_<N> while it replaces it
_OLD_PREFIX = "tmp_old_step_"
# where keep_top_k moves a checkpoint before deleting it, so a crash mid-delete never leaves
# a half-deleted step_<N> that still looks complete
_PRUNED_PREFIX = "tmp_pruned_step_"


def checkpoint_metrics(
    train_metrics: Mapping[str, Any] | None = None,
    val_metrics: Mapping[str, Any] | None = None,
) -> dict[str, float | None]:
    """The `training_info["metrics"]` dict: `{"train:loss": ..., "val:val_loss": ...}`.

    Keys match `checkpointing.metric_name`; non-finite or non-numeric values become None.
    """
    out: dict[str, float | None] = {}
    for prefix, metrics in (("train", train_metrics), ("val", val_metrics)):
        for key, value in (metrics or {}).items():
            out[f"{prefix}:{key}"] = _finite_or_none(value)
    return out


def parse_must_save_by(value: str) -> int:
    """`checkpoint_must_save_by` "DD:HH:MM:SS" (as Slurm's time limit) -> seconds."""
    parts = value.strip().split(":")
    fields = ("days", "hours", "minutes", "seconds")
    limits = (None, 24, 60, 60)
    if len(parts) != 4 or not all(p.isdigit() for p in parts):
        raise ValueError(
            f"checkpointing.checkpoint_must_save_by={value!r}: expected 'DD:HH:MM:SS' "
            f"with four non-negative integers, e.g. '00:03:45:00' for 3 h 45 min"
        )
    numbers = [int(p) for p in parts]
    for name, number, limit in zip(fields, numbers, limits):
        if limit is not None and number >= limit:
            raise ValueError(
                f"checkpointing.checkpoint_must_save_by={value!r}: {name}={number} "
                f"must be below {limit}"
            )
    days, hours, minutes, seconds = numbers
    total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    if total == 0:
        raise ValueError(
            f"checkpointing.checkpoint_must_save_by={value!r}: the time budget must be > 0"
        )
    return total


class CheckpointManager:
    """Names, finalizes, lists and prunes checkpoints under `cfg.checkpoint_dir`.

    The manager only moves directories and reads/writes small JSON/YAML files; the policy
    workers write the model (`policy/weights`, `policy/optimizer`, `hf/`) and the driver
    writes `train_dataloader.pt` into the path `init_tmp_checkpoint` returns.
    """

    def __init__(self, cfg: CheckpointingConfig):
        self.cfg = cfg
        self.checkpoint_dir = Path(cfg.checkpoint_dir)
        self.must_save_by_s: int | None = (
            parse_must_save_by(cfg.checkpoint_must_save_by)
            if cfg.checkpoint_must_save_by is not None
            else None
        )

    # ------------------------------------------------------------ when to save

    def should_save(self, step: int, is_last_step: bool) -> bool:
        """Save after `step` (1-based count of finished steps)? The last step always is."""
        if not self.cfg.enabled:
            return False
        return is_last_step or step % self.cfg.save_period == 0

    def deadline_reached(self, start_time: float, now: float | None = None) -> bool:
        """True once `checkpoint_must_save_by` has elapsed since `start_time` (a `time.time()`).

        The loop then saves and stops, so a job under a wall-clock limit leaves a checkpoint.
        Always False when `checkpoint_must_save_by` is unset.
        """
        if self.must_save_by_s is None:
            return False
        now = time.time() if now is None else now
        return now - start_time >= self.must_save_by_s

    # ------------------------------------------------------------ saving

    def init_tmp_checkpoint(
        self, step: int, training_info: dict, run_config_yaml: str | None = None
    ) -> Path:
        """Create `tmp_step_<step>/` with training_info.json (and config.yaml); return it."""
        info = {"step": step, **training_info}
        if info["step"] != step:
            raise ValueError(f"training_info['step']={info['step']!r} does not match step={step}")
        tmp_path = self.checkpoint_dir / f"{_TMP_PREFIX}{step}"
        if tmp_path.exists():  # a leftover of an interrupted save of the same step
            shutil.rmtree(tmp_path)
        tmp_path.mkdir(parents=True)
        if "metrics" in info:
            info["metrics"] = {k: _finite_or_none(v) for k, v in info["metrics"].items()}
        (tmp_path / TRAINING_INFO).write_text(json.dumps(info, indent=2, allow_nan=False) + "\n")
        if run_config_yaml is not None:
            (tmp_path / RUN_CONFIG).write_text(run_config_yaml)
        return tmp_path

    def finalize_checkpoint(self, tmp_path: Path) -> Path:
        """Flush `tmp_step_<N>/` to disk, rename it to `step_<N>/`, then apply keep_top_k."""
        tmp_path = Path(tmp_path)
        if not tmp_path.name.startswith(_TMP_PREFIX) or not tmp_path.is_dir():
            raise ValueError(f"{tmp_path} is not a directory made by init_tmp_checkpoint")
        step = int(tmp_path.name[len(_TMP_PREFIX) :])
        if not (tmp_path / TRAINING_INFO).is_file():
            raise FileNotFoundError(f"{tmp_path / TRAINING_INFO} is missing; not finalizing")
        _fsync_tree(tmp_path)

        final_path = tmp_path.parent / f"step_{step}"
        old_path = tmp_path.parent / f"{_OLD_PREFIX}{step}"
        if final_path.exists():
            # Replace step_<N> without a moment where neither copy is complete on disk:
            # park the old one, move the new one in, then delete the old one.
            if old_path.exists():
                shutil.rmtree(old_path)
            os.rename(final_path, old_path)
            os.rename(tmp_path, final_path)
            _fsync_dir(final_path.parent)
            shutil.rmtree(old_path)
        else:
            os.rename(tmp_path, final_path)
            _fsync_dir(final_path.parent)

        self._apply_keep_top_k()
        return final_path

    def remove_incomplete(self) -> list[Path]:
        """Delete leftovers of interrupted saves; call once at start. Returns what was deleted.

        `tmp_step_<N>/` (an interrupted save) and `tmp_pruned_step_<N>/` (an interrupted
        keep_top_k deletion) are always deleted. `tmp_old_step_<N>/` (an interrupted
        replacement) is moved back to `step_<N>/` if that is missing, deleted otherwise.
        """
        removed: list[Path] = []
        if not self.checkpoint_dir.is_dir():
            return removed
        for path in sorted(self.checkpoint_dir.iterdir()):
            if not path.is_dir():
                continue
            if path.name.startswith(_OLD_PREFIX):
                final_path = path.parent / f"step_{path.name[len(_OLD_PREFIX):]}"
                if not final_path.exists():
                    os.rename(path, final_path)
                    log.warning("checkpoint: restored %s from an interrupted save", final_path)
                    continue
            elif not path.name.startswith((_TMP_PREFIX, _PRUNED_PREFIX)):
                continue
            log.warning("checkpoint: removing incomplete %s from an interrupted save", path)
            shutil.rmtree(path)
            removed.append(path)
        return removed

    # ------------------------------------------------------------ finding

    def list_checkpoints(self) -> list[tuple[int, Path]]:
        """Complete checkpoints as (step, path), oldest first."""
        if not self.checkpoint_dir.is_dir():
            return []
        found = []
        for path in self.checkpoint_dir.iterdir():
            match = _STEP_RE.fullmatch(path.name)
            if match and path.is_dir() and (path / TRAINING_INFO).is_file():
                found.append((int(match.group(1)), path))
        return sorted(found)

    def get_latest_checkpoint_path(self) -> Path | None:
        """The complete `step_<N>/` with the largest N, or None."""
        checkpoints = self.list_checkpoints()
        return checkpoints[-1][1] if checkpoints else None

    def get_best_checkpoint_path(self) -> Path | None:
        """The best checkpoint by `metric_name`, ranked as keep_top_k ranks.

        The latest one when no checkpoint has the metric or `metric_name` is None.
        """
        ranked = self._rank(self.list_checkpoints())
        return ranked[0][1] if ranked else None

    def load_training_info(self, path: str | Path) -> dict:
        """training_info.json of a checkpoint dir (or of that file itself)."""
        path = Path(path)
        file = path if path.is_file() else path / TRAINING_INFO
        try:
            return json.loads(file.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{file} not found; is {path} a step_<N> checkpoint?"
            ) from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{file} is not valid JSON: {err}") from None

    # ------------------------------------------------------------ keep_top_k

    def _metric_of(self, path: Path) -> float | None:
        if self.cfg.metric_name is None:
            return None
        try:
            metrics = self.load_training_info(path).get("metrics") or {}
        except (FileNotFoundError, ValueError):
            return None
        return _finite_or_none(metrics.get(self.cfg.metric_name))

    def _rank(self, checkpoints: list[tuple[int, Path]]) -> list[tuple[int, Path]]:
        """Best first: by metric (higher_is_better), ties to the newer step; missing metric last,
        newest first among those."""

        def key(item: tuple[int, Path]) -> tuple[int, float, int]:
            step, path = item
            value = self._metric_of(path)
            if value is None:
                return (1, 0.0, -step)
            return (0, -value if self.cfg.higher_is_better else value, -step)

        return sorted(checkpoints, key=key)

    def _apply_keep_top_k(self) -> list[Path]:
        """Keep the `keep_top_k` best checkpoints plus the latest one; delete the rest."""
        k = self.cfg.keep_top_k
        checkpoints = self.list_checkpoints()
        if k is None or not checkpoints:
            return []
        latest_step = checkpoints[-1][0]
        removed = []
        for step, path in self._rank(checkpoints)[k:]:
            if step == latest_step:
                continue
            log.info("checkpoint: keep_top_k=%d, removing %s", k, path)
            pruned = path.parent / f"{_PRUNED_PREFIX}{step}"
            os.rename(path, pruned)
            shutil.rmtree(pruned)
            removed.append(path)
        return removed


def _finite_or_none(value: Any) -> float | None:
    if hasattr(value, "item"):  # numpy / torch scalars
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file, then every directory bottom-up, under `root`."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            file = Path(dirpath) / name
            if file.is_symlink():
                continue
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))
