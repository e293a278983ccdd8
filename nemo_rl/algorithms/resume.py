"""What a resumed run starts from, and the proof that it continues the same run.

    checkpoint = select_checkpoint(checkpointer, cfg.checkpointing.resume)   # auto | never | path
    check_same_data_order(saved_info.get(FINGERPRINT_KEY), data_fingerprint(...), checkpoint)
    load_driver_state(checkpoint, train_dataloader)                           # loader position, RNGs

The driver's half of a checkpoint is `train_dataloader.pt` (the StatefulDataLoader's position in
the current epoch; which epoch, and so which shuffle, is `training_info.json`'s `epoch`, see
`nemo_rl/data/sampler.py`) and `driver_rng.pt` (the Python, NumPy and torch generators of the
driver). The workers save their own half: model and optimizer shards, the scheduler, and the
torch generator of each rank.

The data fingerprint, saved in `training_info.json` under `data_fingerprint`, holds the config
keys that decide which sample comes at which step (`DATA_ORDER_KEYS`, and every field of the
run's `TokenizationOptions` under its config key), a SHA-256 of the training rows and, for a
mixture of datasets, each dataset's number of rows. A resume
whose fingerprint differs would silently skip or repeat samples, so it is refused with the list
of what changed; so is a resume from a checkpoint without a fingerprint, which cannot be checked.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nemo_rl.config.schema import MasterConfig
from nemo_rl.data.processors import TokenizationOptions
from nemo_rl.models.lora import read_adapter_config
from nemo_rl.utils.checkpoint import CheckpointManager

RESUME_AUTO = "auto"
RESUME_NEVER = "never"
DATALOADER_FILE = "train_dataloader.pt"
DRIVER_RNG_FILE = "driver_rng.pt"
FINGERPRINT_KEY = "data_fingerprint"

# Config keys (dotted) whose change changes the sequence of global batches, besides how rows
# become tokens (TokenizationOptions, which with data.overlength=drop decides which samples
# remain). A key naming a section (data.train) stands for every field in it.
DATA_ORDER_KEYS = ("sft.seed", "data.shuffle", "policy.train_global_batch_size", "data.train")


# Where the rows are read from: a moved copy of the same rows (same SHA-256) resumes fine.
_WHERE_THE_ROWS_ARE = re.compile(r"data\.train(\[\d+\])?\.data_path")


class ResumeError(RuntimeError):
    """The run cannot start from the requested checkpoint (or refuses to overwrite one)."""


# ---------------------------------------------------------------- which checkpoint


def select_checkpoint(checkpointer: CheckpointManager, resume: str, *, enabled: bool = True) -> Path | None:
    """The checkpoint to start from per `checkpointing.resume`, after cleaning up interrupted saves.

    auto: the latest complete `step_<N>` in `checkpoint_dir`, or None for a fresh start.
    never: None, but refuse if `checkpoint_dir` already holds complete checkpoints.
    a path: that `step_<N>` directory; refused if `checkpoint_dir` holds later checkpoints,
    which a crash of this run would then resume from instead.
    With checkpointing disabled, auto and never start fresh without looking at the directory.
    """
    if not enabled and resume in (RESUME_AUTO, RESUME_NEVER):
        return None
    checkpointer.remove_incomplete()
    existing = checkpointer.list_checkpoints()
    if resume == RESUME_AUTO:
        return existing[-1][1] if existing else None
    if resume == RESUME_NEVER:
        if existing:
            raise ResumeError(
                f"checkpointing.resume=never, but checkpointing.checkpoint_dir={checkpointer.checkpoint_dir} "
                f"already holds checkpoints ({_names(p for _, p in existing)}), which this run would "
                "overwrite. Give a new checkpoint_dir, delete them, or set checkpointing.resume=auto "
                f"to continue from {existing[-1][1].name}."
            )
        return None
    return _checked_resume_path(Path(resume), checkpointer, existing)


def _checked_resume_path(path: Path, checkpointer: CheckpointManager, existing: list[tuple[int, Path]]) -> Path:
    where = f"checkpointing.resume={str(path)!r}"
    if not path.is_dir():
        raise ResumeError(f"{where}: no such directory; give a step_<N> checkpoint directory, 'auto' or 'never'")
    if path.name.startswith("tmp_"):
        raise ResumeError(f"{where} is an interrupted, incomplete save; give a step_<N> directory")
    info_file = path / "training_info.json"
    if not info_file.is_file():
        inside = sorted(path.glob("step_*"), key=lambda p: _step_of(p.name))
        hint = f"; it looks like a checkpoint_dir, give one of its checkpoints, e.g. {inside[-1]}" if inside else ""
        raise ResumeError(f"{where} is not a checkpoint (no training_info.json){hint}")
    step = checkpoint_step(path)
    later = [p for s, p in existing if s > step and p.resolve() != path.resolve()]
    if later:
        raise ResumeError(
            f"{where} is step {step}, but checkpointing.checkpoint_dir={checkpointer.checkpoint_dir} holds "
            f"later checkpoints ({_names(later)}); after a crash this run would resume from those instead. "
            "Give a new checkpoint_dir, or delete them to rewind this one."
        )
    return path


def last_checkpoint(checkpointer: CheckpointManager, resumed_from: Path | None) -> Path | None:
    """The newest complete checkpoint of this run: the latest in `checkpoint_dir` or the one it
    started from, whichever has the larger step. With checkpointing disabled this run wrote
    nothing, and what `checkpoint_dir` holds is another run's: only the start counts."""
    candidates = checkpointer.list_checkpoints() if checkpointer.cfg.enabled else []
    if resumed_from is not None and (resumed_from / "training_info.json").is_file():
        candidates.append((checkpoint_step(resumed_from), resumed_from))
    return max(candidates, key=lambda c: c[0])[1] if candidates else None


def resume_hint(checkpointer: CheckpointManager, resumed_from: Path | None) -> str:
    """One sentence: where a new run with the same checkpoint_dir would continue from."""
    checkpoint = last_checkpoint(checkpointer, resumed_from)
    if checkpoint is None:
        return "No checkpoint was saved: running the same command again starts from step 0."
    step = checkpoint_step(checkpoint)
    if checkpoint.parent.resolve() == checkpointer.checkpoint_dir.resolve():
        how = "checkpointing.resume=auto (the default)"
    else:
        how = f"checkpointing.resume={checkpoint}"
    return f"A resume will use {checkpoint} (step {step}): run the same command with {how}."


@contextlib.contextmanager
def resume_hint_on_failure(checkpointer: CheckpointManager, resumed_from: Path | None) -> Iterator[None]:
    """Prints `resume_hint` on stderr when the block raises (the error itself follows)."""
    try:
        yield
    except BaseException:
        print(f"\nThe run stopped with an error. {resume_hint(checkpointer, resumed_from)}", file=sys.stderr, flush=True)
        raise


# ---------------------------------------------------------------- the same data order


def data_fingerprint(
    cfg: MasterConfig,
    tokenization: TokenizationOptions,
    train_rows: Iterable[Mapping[str, Any]],
    num_samples: int,
) -> dict[str, Any]:
    """What decides which sample each step sees: `DATA_ORDER_KEYS`, every field of `tokenization`
    (named by its config key), the rows' SHA-256, the counts."""
    flat = _flatten(cfg.model_dump(mode="json"))
    config = {
        key: value
        for key, value in flat.items()
        if any(key == k or key.startswith((k + ".", k + "[")) for k in DATA_ORDER_KEYS)
    }
    config.update(tokenization.by_config_key())
    digest, num_rows = hashlib.sha256(), 0
    for row in train_rows.to_list() if hasattr(train_rows, "to_list") else train_rows:
        digest.update(json.dumps(row, sort_keys=True, default=str).encode())
        digest.update(b"\n")
        num_rows += 1
    fingerprint = {
        "config": json.loads(json.dumps(config, default=str)),
        "train_rows": num_rows,
        "train_rows_sha256": digest.hexdigest(),
        "train_samples": num_samples,
    }
    if hasattr(train_rows, "summary"):  # a mixture (data.train as a list): each dataset's share
        fingerprint["train_mixture"] = train_rows.summary()
    return fingerprint


def check_same_data_order(saved: Mapping[str, Any] | None, current: Mapping[str, Any], checkpoint: Path) -> None:
    """Refuses (ResumeError) a resume whose data order differs from the run that wrote `checkpoint`,
    or cannot be compared with it (no fingerprint)."""
    if saved is None:
        raise ResumeError(
            f"cannot resume from {checkpoint}: its training_info.json has no {FINGERPRINT_KEY}, so "
            "whether this run would see the same samples in the same order cannot be checked (every "
            "checkpoint this training loop writes has one). Start a new run in a new "
            "checkpointing.checkpoint_dir" + _start_from_these_weights(checkpoint)
        )
    changes = []
    same_rows = saved["train_rows_sha256"] == current["train_rows_sha256"]
    old_config, new_config = saved["config"], current["config"]
    for key in sorted(set(old_config) | set(new_config)):
        old, new = old_config.get(key, "<unset>"), new_config.get(key, "<unset>")
        if (old, new) in (("<unset>", None), (None, "<unset>")):
            continue  # a key added since (e.g. data.train.max_samples), at its off value: no change
        if old != new and not (same_rows and _WHERE_THE_ROWS_ARE.fullmatch(key)):
            changes.append(f"{key}: {old!r} -> {new!r}")
    if saved.get("train_mixture") != current.get("train_mixture"):
        changes.append(f"the mixture's rows per dataset: {saved.get('train_mixture')} -> {current.get('train_mixture')}")
    if not same_rows:
        changes.append(
            f"the training rows' contents: {saved['train_rows']} rows (sha256 "
            f"{saved['train_rows_sha256'][:12]}) -> {current['train_rows']} rows "
            f"(sha256 {current['train_rows_sha256'][:12]})"
        )
    elif saved["train_samples"] != current["train_samples"]:
        changes.append(
            f"training samples left after length handling: {saved['train_samples']} -> {current['train_samples']}"
        )
    if changes:
        raise ResumeError(
            f"cannot resume from {checkpoint}: the data order would differ from the run that wrote it, "
            "so the resumed run would skip or repeat samples. Changed:\n  - "
            + "\n  - ".join(changes)
            + "\nUndo the change, or start a new run in a new checkpointing.checkpoint_dir"
            + _start_from_these_weights(checkpoint)
        )


def _start_from_these_weights(checkpoint: Path) -> str:
    """How a new run starts from a checkpoint's weights: its hf/, or a LoRA run's merged copy."""
    if read_adapter_config(checkpoint / "hf") is None:
        return f" (to start from these weights: policy.model_name={checkpoint / 'hf'})."
    if (checkpoint / "hf_merged").is_dir():
        return f" (to start from these weights: policy.model_name={checkpoint / 'hf_merged'})."
    return (
        f"; {checkpoint / 'hf'} is a LoRA adapter, which a new run cannot start from "
        "(checkpointing.save_merged=true also writes the merged model)."
    )


# ---------------------------------------------------------------- the driver's state


def seed_driver_rngs(seed: int) -> None:
    """Seeds the driver's Python, NumPy and torch generators (each worker seeds its own)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def driver_rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_driver_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_driver_state(path: Path, train_dataloader) -> None:
    """Writes the loader's position and the driver's generators into the checkpoint dir `path`."""
    torch.save(train_dataloader.state_dict(), path / DATALOADER_FILE)
    torch.save(driver_rng_state(), path / DRIVER_RNG_FILE)


def load_driver_state(path: Path, train_dataloader) -> None:
    """The inverse of `save_driver_state`."""
    train_dataloader.load_state_dict(torch.load(path / DATALOADER_FILE, weights_only=False))
    set_driver_rng_state(torch.load(path / DRIVER_RNG_FILE, weights_only=False))


# ---------------------------------------------------------------- helpers


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint directory was saved after (its training_info.json)."""
    return int(json.loads((path / "training_info.json").read_text())["step"])


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, list) and value and all(isinstance(item, Mapping) for item in value):
        out: dict[str, Any] = {}  # a list of sections, e.g. data.train as a mixture: data.train[0].seed
        for index, item in enumerate(value):
            out.update(_flatten(item, f"{prefix}[{index}]"))
        return out
    if not isinstance(value, Mapping):
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, item in value.items():
        out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    if not value and prefix:
        out[prefix] = {}
    return out


def _step_of(name: str) -> int:
    try:
        return int(name.rsplit("_", 1)[-1])
    except ValueError:
        return -1


def _names(paths: Iterable[Path], limit: int = 6) -> str:
    names = [p.name for p in paths]
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
