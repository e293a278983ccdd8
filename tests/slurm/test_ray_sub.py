"""slurm/ray.sub on a real Slurm cluster of two emulated nodes (tests/slurm/slurm_cluster.py).

The tiny quickstart on 2 nodes x 1 CPU worker, submitted with sbatch as a user would, must
train as the single-node run on 2 workers does (`reference_run`, tests/conftest.py): a worker
on each node, the same per-step losses, a loadable hf/ checkpoint. A job signalled early
(`scancel --batch --signal=TERM`, what `--signal=B:TERM@...` does at the time limit) saves a
checkpoint, and slurm/sft_resubmit.sub's successor resumes from it to the uninterrupted job's
final weights. No Ray process of a job outlives it.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.functional.sft_runs import (
    REPO,
    TOTAL_STEPS,
    assert_hf_loads_with_weights_of,
    assert_same_weights,
    checkpoint_steps,
    run_args,
    step_metrics,
    worker_pids,
)

JOB_TIMEOUT_S = 600
# A test may wait for two jobs and, run alone, make the session's reference run first.
pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(3 * JOB_TIMEOUT_S)]
# 2 nodes x 1 worker; one checkpoint, at the end (or on the stop signal): saves cost time here.
TWO_NODES = ("cluster.num_nodes=2", "cluster.cpu_workers_per_node=1", "checkpointing.save_period=100")


@dataclass
class Job:
    job_id: int
    info: dict[str, str]  # scontrol show job, once it ended
    log_dir: Path  # ray.sub's LOG_DIR
    output: str  # the job's own output (ray.sub's progress lines)

    @property
    def driver_log(self) -> str:
        return (self.log_dir / "driver.log").read_text(errors="replace")

    def describe(self) -> str:
        logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(self.log_dir.glob("*.log")))
        return f"job {self.job_id}: {self.info.get('JobState')} {self.info.get('ExitCode')}\n{self.output}\n{logs}"


@pytest.fixture(scope="module")
def ray_tmpdir():
    """Where the jobs' Ray nodes keep their temp dirs: short (Ray's sockets), and ours alone, so
    that a Ray process left behind is found by its command line."""
    path = Path(tempfile.mkdtemp(prefix="nrl-ray-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def sft_command(root: Path, data_dir: Path, *extra: str) -> str:
    args = run_args(root, data_dir, *TWO_NODES, *extra)
    return "uv run examples/run_sft.py --config configs/sft_tiny.yaml " + shlex.join(args)


def submit(slurm, script: str, root: Path, command: str, ray_tmpdir: Path, **env: str) -> int:
    return slurm.sbatch(
        REPO / "slurm" / script,
        f"--output={root}/slurm-%j.out",
        "--time=20",
        env={"COMMAND": command, "BASE_LOG_DIR": str(root), "RAY_TMPDIR": str(ray_tmpdir), **env},
        cwd=REPO,  # the submit dir: the checkout and its .venv, as for a user
    )


def finished(slurm, job_id: int, root: Path) -> Job:
    info = slurm.wait_for_job(job_id, timeout=JOB_TIMEOUT_S)
    output = (root / f"slurm-{job_id}.out").read_text(errors="replace")
    return Job(job_id, info, root / f"slurm-{job_id}-logs", output)


def ray_processes_left(ray_tmpdir: Path) -> list[str]:
    ps = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [line for line in ps.splitlines() if f"{ray_tmpdir}/" in line]


@pytest.fixture(scope="module")
def uninterrupted_job(slurm, reference_run, tmp_path_factory, ray_tmpdir) -> Job:
    root = tmp_path_factory.mktemp("uninterrupted")
    started = time.monotonic()
    job_id = submit(slurm, "ray.sub", root, sft_command(root, reference_run.data_dir), ray_tmpdir)
    job = finished(slurm, job_id, root)
    print(f"\nuninterrupted 2-node job: {time.monotonic() - started:.0f} s from sbatch to its end")
    return job


def test_a_two_node_job_trains_as_one_node_with_two_workers(uninterrupted_job, reference_run, ray_tmpdir):
    job = uninterrupted_job
    assert job.info["JobState"] == "COMPLETED" and job.info["ExitCode"] == "0:0", job.describe()
    assert "all 2 node(s) joined the Ray cluster" in job.output
    assert "the driver exited with status 0" in job.output

    # Rank 0 on the head node (where the driver runs), rank 1 on the other: each node's raylet
    # started it, and Ray names a worker's log files after its pid.
    pids = worker_pids(job.driver_log)
    for rank, node in ((0, "node1"), (1, "node2")):
        assert list((job.log_dir / "ray-logs" / node).glob(f"worker-*-{pids[rank]}.out")), (rank, node, job.describe())

    root = job.log_dir.parent
    metrics = step_metrics(root / "logs")
    assert sorted(metrics) == list(range(1, TOTAL_STEPS + 1))
    for step, (loss, tokens) in metrics.items():
        assert tokens == reference_run.metrics[step][1], step
        assert loss == pytest.approx(reference_run.metrics[step][0], rel=1e-5), step
    final = f"step_{TOTAL_STEPS}"
    assert_hf_loads_with_weights_of(root / "ckpt" / final, reference_run.ckpt_dir / final)

    assert ray_processes_left(ray_tmpdir) == []
    assert not list(ray_tmpdir.iterdir())  # each node removed its temp dir


def test_a_job_signalled_before_its_time_limit_saves_and_its_successor_resumes(
    slurm, uninterrupted_job, reference_run, tmp_path, ray_tmpdir
):
    # Checkpoints only at the end: the one before it can only come from the signal.
    command = sft_command(tmp_path, reference_run.data_dir)
    first_id = submit(
        slurm, "sft_resubmit.sub", tmp_path, command, ray_tmpdir, RESUBMIT_ARGS=f"--output={tmp_path}/slurm-%j.out --time=20"
    )
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while 2 not in step_metrics(tmp_path / "logs"):
        assert slurm.job(first_id).get("JobState") in ("PENDING", "RUNNING"), slurm.job(first_id)
        assert time.monotonic() < deadline, f"job {first_id} did not reach step 2"
        time.sleep(0.5)
    subprocess.run(["scancel", "--batch", "--signal=TERM", str(first_id)], env=slurm.env, check=True)

    first = finished(slurm, first_id, tmp_path)
    assert first.info["JobState"] == "COMPLETED" and first.info["ExitCode"] == "0:0", first.describe()
    assert "SIGTERM received: forwarding it to the driver" in first.output, first.describe()
    assert "SIGTERM received: finishing the current step, then saving a checkpoint" in first.driver_log
    (stopped_at,) = checkpoint_steps(tmp_path / "ckpt")
    assert 2 <= stopped_at < TOTAL_STEPS, first.describe()

    successor_id = int(re.search(r"submitted job (\d+)", first.output).group(1))
    second = finished(slurm, successor_id, tmp_path)
    assert second.info["JobState"] == "COMPLETED" and second.info["ExitCode"] == "0:0", second.describe()
    assert "resumes from" in second.driver_log and f"step_{stopped_at}" in second.driver_log, second.describe()
    assert "not resubmitting" in second.output  # it ended without the signal
    rows = map(json.loads, (tmp_path / "logs" / "exp_002" / "metrics.jsonl").read_text().splitlines())
    resumed_steps = [row["step"] for row in rows if "train/loss" in row]
    assert resumed_steps == list(range(stopped_at + 1, TOTAL_STEPS + 1))

    # The chain trained every step once, as the uninterrupted job did, to its final weights.
    assert step_metrics(tmp_path / "logs") == step_metrics(uninterrupted_job.log_dir.parent / "logs")
    final = f"step_{TOTAL_STEPS}"
    assert_same_weights(tmp_path / "ckpt" / final, uninterrupted_job.log_dir.parent / "ckpt" / final)
    assert ray_processes_left(ray_tmpdir) == []


def test_a_node_whose_ray_cannot_start_fails_the_job_at_once_naming_it(slurm, tmp_path, ray_tmpdir):
    started = time.monotonic()
    job_id = submit(
        slurm, "ray.sub", tmp_path, "echo never run", ray_tmpdir, RAY_START_ARGS="--num-cpus=many", RAY_START_ATTEMPTS="2"
    )
    job = finished(slurm, job_id, tmp_path)
    assert job.info["JobState"] == "FAILED" and job.info["ExitCode"] == "1:0", job.describe()
    assert "error: Ray did not start on node node1 (node 0); its log" in job.output, job.describe()
    assert "Invalid value for '--num-cpus'" in job.output  # the end of that log, quoted
    assert "ray start failed 2 times" in job.output
    assert "running on node1" not in job.output and not (job.log_dir / "driver.log").exists()
    assert time.monotonic() - started < 120, job.describe()  # not RAY_JOIN_TIMEOUT
    assert ray_processes_left(ray_tmpdir) == []
