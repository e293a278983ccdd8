"""Whole runs of examples/run_sft.py for the resume and fault tests: start, watch, signal, compare.

A run writes stdout and stderr to one file, so a test can wait for a line while the run goes on
(`wait_for`), and is started in its own session, so that `stopped` can always end whatever is
left of it (the driver and the Ray processes it started).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
SQUAD_TINY = REPO / "assets" / "squad-tiny"

STEPS_PER_EPOCH = 3
TOTAL_STEPS = 6  # two epochs
# 48 training rows in global batches of 16: epochs of 3 steps, every step saved.
RUN_OVERRIDES = (
    f"sft.max_num_steps={TOTAL_STEPS}",
    "sft.max_num_epochs=2",
    "sft.val_period=0",
    "sft.val_at_start=false",
    "sft.val_at_end=false",
    "checkpointing.save_period=1",
    "checkpointing.keep_top_k=null",
)
# For a run whose checks read only its final checkpoint (always saved): a save per step is
# seconds of a whole run's time.
FINAL_SAVE_ONLY = "checkpointing.save_period=100"


def write_small_squad(path: Path, *, rows: int = 48, edit_row: int | None = None) -> Path:
    """The first `rows` rows of the embedded set (one answer changed if `edit_row`), 8 for validation."""
    path.mkdir(parents=True, exist_ok=True)
    lines = (SQUAD_TINY / "train.jsonl").read_text().splitlines()[:rows]
    if edit_row is not None:
        row = json.loads(lines[edit_row])
        row["answers"]["text"][0] += " indeed"
        lines[edit_row] = json.dumps(row)
    (path / "train.jsonl").write_text("\n".join(lines) + "\n")
    validation = (SQUAD_TINY / "validation.jsonl").read_text().splitlines()[:8]
    (path / "validation.jsonl").write_text("\n".join(validation) + "\n")
    return path


def run_args(root: Path, data_dir: Path, *extra: str) -> list[str]:
    """Overrides of one run: its checkpoint and log dirs under `root`, the small data set, `extra`."""
    return [
        *RUN_OVERRIDES,
        f"data.train.data_path={data_dir}",
        f"checkpointing.checkpoint_dir={root / 'ckpt'}",
        f"logger.log_dir={root / 'logs'}",
        *extra,
    ]


class SFTProcess:
    """One `examples/run_sft.py` process; its output goes to `log_file`."""

    def __init__(
        self, overrides: list[str], log_file: Path, *, python: tuple[str, ...] = (sys.executable,), env: dict[str, str] | None = None
    ):
        """`python`: how the script is started, e.g. ("uv", "run") as the README does; `env`: on top of ours."""
        self.log_file = log_file
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1", **(env or {})}
        cmd = [*python, str(REPO / "examples" / "run_sft.py"), "--config", str(REPO / "configs" / "sft_tiny.yaml"), *overrides]
        with open(log_file, "w") as out:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.proc.pid

    @property
    def output(self) -> str:
        return self.log_file.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 300) -> re.Match:
        """The first match of `pattern` in the output; fails if the run ends or times out first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.output)
            if match:
                return match
            if self.proc.poll() is not None:
                raise AssertionError(f"the run ended (rc {self.proc.returncode}) before {pattern!r}:\n{self.output[-4000:]}")
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} within {timeout} s:\n{self.output[-4000:]}")

    def finish(self, timeout: float = 420) -> int:
        return self.proc.wait(timeout=timeout)

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def worker_pids(self, occurrence: int = -1) -> dict[int, int]:
        return worker_pids(self.output, occurrence)

    def kill_everything(self) -> None:
        """Ends the driver and what is left in its session (Ray's processes)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)


@contextlib.contextmanager
def started(overrides: list[str], log_file: Path, **kwargs) -> Iterator[SFTProcess]:
    run = SFTProcess(overrides, log_file, **kwargs)
    try:
        yield run
    finally:
        if run.proc.poll() is None:
            run.kill_everything()


def worker_pids(output: str, occurrence: int = -1) -> dict[int, int]:
    """{rank: pid} from a run's "policy workers: rank 0 pid 123 on ..." line (the last one by
    default; there is one per start of the worker group)."""
    lines = re.findall(r"policy workers: (.*)", output)
    return {int(r): int(p) for r, p in re.findall(r"rank (\d+) pid (\d+)", lines[occurrence])}


def run_to_end(overrides: list[str], log_file: Path, timeout: float = 420, **kwargs) -> tuple[int, str]:
    with started(overrides, log_file, **kwargs) as run:
        return run.finish(timeout), run.output


# ---------------------------------------------------------------- what a run left


def step_metrics(log_dir: Path) -> dict[int, tuple[float, float]]:
    """{step: (train loss, valid tokens)} over all of `log_dir`'s exp_* runs; a step logged
    twice (repeated after a worker restart) keeps its last value."""
    out: dict[int, tuple[float, float]] = {}
    for metrics_file in sorted(Path(log_dir).glob("exp_*/metrics.jsonl")):
        for line in metrics_file.read_text().splitlines():
            row = json.loads(line)
            if "train/loss" in row:
                out[row["step"]] = (row["train/loss"], row["train/num_valid_tokens"])
    return out


def metric_rows(log_dir: Path, name: str) -> list[dict]:
    rows = []
    for metrics_file in sorted(Path(log_dir).glob("exp_*/metrics.jsonl")):
        rows += [row for row in map(json.loads, metrics_file.read_text().splitlines()) if name in row]
    return rows


def hf_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "hf" / "model.safetensors")


def assert_same_weights(a: Path, b: Path, *, atol: float = 0.0) -> None:
    wa, wb = hf_weights(a), hf_weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        if atol == 0.0:
            assert torch.equal(wa[key], wb[key]), f"{key} differs between {a} and {b}"
        else:
            torch.testing.assert_close(wa[key], wb[key], atol=atol, rtol=1e-5, msg=f"{key}: {a} vs {b}")


def checkpoint_steps(ckpt_dir: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in Path(ckpt_dir).glob("step_*"))


def is_complete(checkpoint: Path) -> bool:
    return all(
        (checkpoint / f).is_file()
        for f in ("training_info.json", "train_dataloader.pt", "driver_rng.pt", "hf/model.safetensors", "policy/weights/.metadata", "policy/optimizer/.metadata")
    )


def assert_hf_loads_with_weights_of(checkpoint: Path, expected: Path, *, rtol: float = 1e-5) -> None:
    """`checkpoint`/hf loads with transformers, and its parameters are `expected`'s saved ones."""
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(checkpoint / "hf").state_dict()
    for key, value in hf_weights(expected).items():
        torch.testing.assert_close(loaded[key], value, rtol=rtol, atol=1e-7, msg=f"{key}: {checkpoint} vs {expected}")
