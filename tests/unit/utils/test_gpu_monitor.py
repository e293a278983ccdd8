"""GPU monitor: nvidia-smi parsing, metric names, the sampling loop into the JSONL log, and
on Ray: one pinned sampler per GPU node, nothing at all on a CPU-only cluster.

nvidia-smi is a fake on PATH: a script that prints CSV lines, with GPU 0's utilization
counting the calls, so the order and number of samples can be read back from the log.
"""

from __future__ import annotations

import os
import stat
import time

import pytest
import ray

from nemo_rl.config.schema import GpuMonitoringConfig, LoggerConfig
from nemo_rl.utils.gpu_monitor import (
    NO_GPUS_MESSAGE,
    GpuMonitor,
    GpuReading,
    gpu_metrics,
    parse_nvidia_smi_csv,
    query_gpus,
    start_gpu_monitor,
)
from nemo_rl.utils.logger import Logger, read_metrics

# GPU 0: utilization = the call count; GPU 1: reports no utilization (as MIG slices do).
FAKE_NVIDIA_SMI = """#!/bin/sh
counter="{counter}"
n=$(( $(cat "$counter" 2>/dev/null || echo 0) + 1 ))
echo "$n" > "$counter"
echo "0, $n, 2048"
echo "1, [N/A], 512"
"""


@pytest.fixture
def fake_nvidia_smi(tmp_path, monkeypatch):
    """A fake nvidia-smi first on PATH; returns the file counting its calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    counter = tmp_path / "calls"
    script = bin_dir / "nvidia-smi"
    script.write_text(FAKE_NVIDIA_SMI.format(counter=counter))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return counter


def make_logger(tmp_path) -> Logger:
    return Logger(LoggerConfig(log_dir=str(tmp_path / "logs")))


def system_records(logger: Logger) -> list[dict]:
    return [r for r in read_metrics(logger.metrics_path) if any(k.startswith("system/") for k in r)]


# ---------------------------------------------------------------- parsing and names


def test_parse_reads_index_utilization_and_memory_and_unreported_fields():
    text = "0, 87, 40536\n1, [N/A], [Not Supported]\n\n7, 0, 0\n"
    assert parse_nvidia_smi_csv(text) == [
        GpuReading(0, 87.0, 40536.0),
        GpuReading(1, None, None),
        GpuReading(7, 0.0, 0.0),
    ]
    assert parse_nvidia_smi_csv("") == []


def test_parse_refuses_unexpected_lines_naming_them():
    with pytest.raises(ValueError, match=r"line 2: expected 'index, utilization, memory.used', got 'No devices'"):
        parse_nvidia_smi_csv("0, 1, 2\nNo devices\n")


def test_metric_names_per_node_and_gpu_in_gib():
    metrics = gpu_metrics(
        {
            1: [GpuReading(0, 50.0, 1536.0)],
            0: [GpuReading(0, 87.0, 40960.0), GpuReading(3, None, 512.0)],
        }
    )
    assert metrics == {
        "system/node_0/gpu_0/utilization": 87.0,
        "system/node_0/gpu_0/memory_used_gb": 40.0,
        "system/node_0/gpu_3/memory_used_gb": 0.5,
        "system/node_1/gpu_0/utilization": 50.0,
        "system/node_1/gpu_0/memory_used_gb": 1.5,
    }


def test_query_gpus_runs_nvidia_smi_from_path(fake_nvidia_smi):
    assert query_gpus() == [GpuReading(0, 1.0, 2048.0), GpuReading(1, None, 512.0)]
    assert query_gpus()[0].utilization == 2.0  # a fresh call each time


def test_query_gpus_says_why_nvidia_smi_failed(tmp_path, monkeypatch):
    failing = tmp_path / "nvidia-smi"
    failing.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed because it could not communicate' >&2\nexit 9\n")
    failing.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="nvidia-smi exited with status 9: NVIDIA-SMI has failed"):
        query_gpus()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(RuntimeError, match="nvidia-smi is not on PATH"):
        query_gpus()


# ---------------------------------------------------------------- the loop, into the JSONL log


class ThisMachine:
    """This process's nvidia-smi as node 0 (what one RayGpuNodes sampler does on its node)."""

    shut_down = False

    def sample(self):
        return {0: query_gpus()}

    def shutdown(self):
        self.shut_down = True


def test_loop_samples_every_interval_and_flushes_into_the_jsonl_log(tmp_path, fake_nvidia_smi):
    logger = make_logger(tmp_path)
    logger.log_metrics({"loss": 2.0}, step=3, prefix="train")
    cfg = GpuMonitoringConfig(collection_interval=0.05, flush_interval=0.3)
    monitor = GpuMonitor(ThisMachine(), logger.log_system_metrics, cfg).start()

    deadline = time.monotonic() + 20
    while not system_records(logger) and time.monotonic() < deadline:
        time.sleep(0.05)
    flushed_while_running = system_records(logger)
    time.sleep(0.2)
    monitor.stop()
    monitor.stop()  # idempotent
    assert monitor.source.shut_down
    calls = int(fake_nvidia_smi.read_text())
    logger.finish()

    assert flushed_while_running, "nothing was flushed while the monitor ran"
    records = system_records(logger)
    # every sample taken is in the log, once, in order; GPU 1 reports memory only
    assert [r["system/node_0/gpu_0/utilization"] for r in records] == list(range(1, calls + 1))
    assert calls >= 3
    for record in records:
        assert set(record) == {
            "step",
            "system/elapsed_s",
            "system/node_0/gpu_0/utilization",
            "system/node_0/gpu_0/memory_used_gb",
            "system/node_0/gpu_1/memory_used_gb",
        }
        assert record["step"] == 3  # the latest training step logged
        assert record["system/node_0/gpu_0/memory_used_gb"] == 2.0
        assert record["system/node_0/gpu_1/memory_used_gb"] == 0.5
    elapsed = [r["system/elapsed_s"] for r in records]
    assert elapsed == sorted(elapsed) and elapsed[-1] - elapsed[0] >= 0.05 * (len(elapsed) - 1) * 0.9


def test_system_metrics_follow_the_latest_step_and_stop_after_finish(tmp_path):
    logger = make_logger(tmp_path)
    logger.log_system_metrics({"system/x": 1.0})
    logger.log_metrics({"loss": 1.0}, step=5, prefix="train")
    logger.log_metrics({"val_loss": 1.0}, step=2, prefix="validation")  # an older step: not the latest
    logger.log_system_metrics({"system/x": 2.0})
    logger.finish()
    logger.log_system_metrics({"system/x": 3.0})  # after finish: dropped, no error
    assert [(r["step"], r["system/x"]) for r in system_records(logger)] == [(0, 1.0), (5, 2.0)]


# ---------------------------------------------------------------- on Ray


@pytest.fixture(scope="module")
def ray_nodes(tmp_path_factory):
    """A Ray cluster of separate node processes on this machine: a head without GPUs first;
    `add_gpu_node` adds a node declaring 2 GPUs. The nodes' processes (and so the samplers)
    see the fake nvidia-smi: PATH is set before any node starts."""
    from ray.cluster_utils import Cluster

    from nemo_rl.distributed import init_ray, shutdown_ray

    root = tmp_path_factory.mktemp("gpu_monitor_ray")
    bin_dir = root / "bin"
    bin_dir.mkdir()
    script = bin_dir / "nvidia-smi"
    script.write_text(FAKE_NVIDIA_SMI.format(counter=root / "calls"))
    script.chmod(0o755)
    mp = pytest.MonkeyPatch()
    mp.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    mp.setenv("RAY_AUTH_MODE", "disabled")
    shutdown_ray()  # the session's local Ray (tests/unit/conftest.py), if another test started it
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    mp.setenv("RAY_ADDRESS", cluster.address)
    init_ray()

    def add_gpu_node():
        node = cluster.add_node(num_cpus=1, num_gpus=2)
        cluster.wait_for_nodes()
        return node

    yield add_gpu_node
    shutdown_ray()
    cluster.shutdown()
    mp.undo()


def _sampler_actors() -> list[dict]:
    return [a for a in ray._private.state.actors().values() if a["ActorClassName"].endswith("GpuSampler")]


@pytest.mark.ray
def test_cpu_only_cluster_prints_one_line_and_starts_nothing(ray_nodes, tmp_path, capsys):
    assert ray.cluster_resources().get("GPU", 0) == 0
    logger = make_logger(tmp_path)
    assert start_gpu_monitor(logger, GpuMonitoringConfig()) is None
    assert capsys.readouterr().out == NO_GPUS_MESSAGE + "\n"
    assert _sampler_actors() == []
    logger.finish()
    assert system_records(logger) == []


@pytest.mark.ray
def test_one_pinned_sampler_per_gpu_node_into_the_log(ray_nodes, tmp_path, capsys):
    first, second = ray_nodes(), ray_nodes()
    logger = make_logger(tmp_path)
    logger.log_metrics({"loss": 1.0}, step=1, prefix="train")
    cfg = GpuMonitoringConfig(collection_interval=0.1, flush_interval=0.1)
    monitor = start_gpu_monitor(logger, cfg)
    assert monitor is not None
    assert "GPU monitor: node_0 = " in capsys.readouterr().out

    # one sampler on each GPU node, none on the head
    samplers = monitor.source
    placed = {samplers.nodes[i].node_id: ray.get(actor.node_id.remote()) for i, actor in samplers.actors.items()}
    assert set(placed) == {first.node_id, second.node_id}
    assert all(want == got for want, got in placed.items())

    time.sleep(0.5)
    logger.log_metrics({"loss": 0.5}, step=2, prefix="train")
    time.sleep(0.3)
    logger.finish()  # stops the monitor and writes its last samples first
    assert _sampler_actors_alive() == 0

    records = system_records(logger)
    assert len(records) >= 3
    want_keys = {
        f"system/node_{node}/gpu_{gpu}/{field}"
        for node in (0, 1)
        for gpu, field in ((0, "utilization"), (0, "memory_used_gb"), (1, "memory_used_gb"))
    }
    assert all(set(r) == want_keys | {"step", "system/elapsed_s"} for r in records)
    assert {r["step"] for r in records} == {1, 2}
    assert all(r["system/node_1/gpu_0/memory_used_gb"] == 2.0 for r in records)
    monitor.stop()  # SFTRun.shutdown calls it again: nothing more happens


def _sampler_actors_alive() -> int:
    deadline = time.monotonic() + 10
    while True:
        alive = [a for a in _sampler_actors() if a["State"] != "DEAD"]
        if not alive or time.monotonic() > deadline:
            return len(alive)
        time.sleep(0.1)
