"""GPU utilisation and memory of every GPU node of the Ray cluster, sampled into the logs.

    monitor = start_gpu_monitor(logger, cfg.logger.gpu_monitoring)  # None on a CPU-only cluster
    ...
    monitor.stop()  # idempotent; Logger.finish() calls it too, so the last samples get written

One sampler actor per node that has GPUs, pinned there (node affinity; it reserves no CPU or
GPU, so it takes no slot from the workers), runs `nvidia-smi` when asked; nvidia-smi sees all
of the node's GPUs whatever CUDA_VISIBLE_DEVICES says. A driver thread asks every node at once
each `collection_interval` seconds and hands the buffered samples to the Logger each
`flush_interval` seconds, one record per sample:

    system/node_<i>/gpu_<j>/utilization      percent of the last sample period a kernel ran
    system/node_<i>/gpu_<j>/memory_used_gb   GiB in use on the GPU (all processes)
    system/elapsed_s                          seconds since the monitor started

node_<i>: the GPU nodes in order of IP address (printed at start); gpu_<j>: nvidia-smi's index.
The records carry the latest training step logged (`Logger.log_system_metrics`).

A node that fails (nvidia-smi errors, the node died) is reported on stderr once and no longer
sampled; training goes on. See docs/logging.md.
"""

from __future__ import annotations

import ipaddress
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import ray

from nemo_rl.config.schema import GpuMonitoringConfig

NVIDIA_SMI_QUERY = (
    "nvidia-smi",
    "--query-gpu=index,utilization.gpu,memory.used",
    "--format=csv,noheader,nounits",
)
NVIDIA_SMI_TIMEOUT_S = 30.0
NO_GPUS_MESSAGE = "logger.monitor_gpus: the Ray cluster has no GPUs; nothing to monitor"


class GpuReading(NamedTuple):
    index: int
    utilization: float | None  # percent; None when the GPU does not report it (e.g. MIG)
    memory_used_mib: float | None


# ---------------------------------------------------------------- one node: nvidia-smi


def parse_nvidia_smi_csv(text: str) -> list[GpuReading]:
    """The readings of `nvidia-smi --query-gpu=index,utilization.gpu,memory.used
    --format=csv,noheader,nounits`: one `index, percent, MiB` line per GPU. A field the GPU
    does not report ("[N/A]", "[Not Supported]") becomes None."""
    readings = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = [field.strip() for field in line.split(",")]
        if len(fields) != 3 or not fields[0].isdigit():
            raise ValueError(
                f"nvidia-smi output line {line_no}: expected 'index, utilization, memory.used', got {line!r}"
            )
        readings.append(GpuReading(int(fields[0]), _number_or_none(fields[1]), _number_or_none(fields[2])))
    return readings


def query_gpus(command: tuple[str, ...] = NVIDIA_SMI_QUERY) -> list[GpuReading]:
    """This machine's GPUs, as nvidia-smi (found on PATH) reports them now."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S)
    except FileNotFoundError:
        raise RuntimeError(f"{command[0]} is not on PATH") from None
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{command[0]} did not answer within {NVIDIA_SMI_TIMEOUT_S:g} s") from None
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip()
        raise RuntimeError(f"{command[0]} exited with status {done.returncode}: {detail}")
    return parse_nvidia_smi_csv(done.stdout)


class GpuSampler:
    """The actor each GPU node runs (wrapped with ray.remote by `start_gpu_monitor`)."""

    def sample(self) -> list[GpuReading]:
        return query_gpus()

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()


def gpu_metrics(readings_by_node: dict[int, list[GpuReading]]) -> dict[str, float]:
    """{system/node_<i>/gpu_<j>/utilization: percent, .../memory_used_gb: GiB}; fields a GPU
    does not report are left out."""
    metrics: dict[str, float] = {}
    for node, readings in sorted(readings_by_node.items()):
        for gpu in readings:
            prefix = f"system/node_{node}/gpu_{gpu.index}"
            if gpu.utilization is not None:
                metrics[f"{prefix}/utilization"] = gpu.utilization
            if gpu.memory_used_mib is not None:
                metrics[f"{prefix}/memory_used_gb"] = gpu.memory_used_mib / 1024
    return metrics


# ---------------------------------------------------------------- the loop


class GpuSource(Protocol):
    def sample(self) -> dict[int, list[GpuReading]]:
        """{node index: readings} of the nodes that answered."""

    def shutdown(self) -> None: ...


class GpuMonitor:
    """Calls `source.sample()` every `collection_interval` s on a thread and writes the
    buffered samples with `log` every `flush_interval` s (and at `stop`).

    `source` is a `RayGpuNodes` in a run; `log` is `Logger.log_system_metrics`.
    """

    def __init__(self, source: GpuSource, log: Callable[[dict[str, float]], None], cfg: GpuMonitoringConfig):
        self.source = source
        self._log = log
        self.collection_interval = cfg.collection_interval
        self.flush_interval = cfg.flush_interval
        self._buffer: list[dict[str, float]] = []
        self._buffer_lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._started_at = time.monotonic()
        self._last_flush = self._started_at
        self._stopped = False

    def collect(self) -> None:
        """Take one sample of every node into the buffer."""
        metrics = gpu_metrics(self.source.sample())
        if metrics:
            metrics["system/elapsed_s"] = round(time.monotonic() - self._started_at, 3)
            with self._buffer_lock:
                self._buffer.append(metrics)

    def flush(self) -> None:
        """Write the buffered samples, oldest first."""
        with self._buffer_lock:
            samples, self._buffer = self._buffer, []
        self._last_flush = time.monotonic()
        for metrics in samples:
            self._log(metrics)

    def start(self) -> GpuMonitor:
        self._thread = threading.Thread(target=self._run, name="gpu-monitor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sampling, write what is buffered, release the samplers; idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
        self.flush()
        self.source.shutdown()

    def _run(self) -> None:
        next_sample = time.monotonic() + self.collection_interval
        while not self._stopping.wait(max(0.0, next_sample - time.monotonic())):
            self.collect()
            now = time.monotonic()
            next_sample = max(next_sample + self.collection_interval, now)
            if now - self._last_flush >= self.flush_interval:
                self.flush()


# ---------------------------------------------------------------- the Ray cluster's GPU nodes


@dataclass(frozen=True)
class GpuNode:
    index: int  # the i of system/node_<i>
    node_id: str
    ip: str
    hostname: str
    num_gpus: int


def gpu_nodes() -> list[GpuNode]:
    """The alive nodes of the Ray cluster that have GPUs, in order of IP address."""
    alive = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU", 0) > 0]
    alive.sort(key=lambda n: (_ip_sort_key(n["NodeManagerAddress"]), n["NodeID"]))
    return [
        GpuNode(i, n["NodeID"], n["NodeManagerAddress"], n["NodeManagerHostname"], int(n["Resources"]["GPU"]))
        for i, n in enumerate(alive)
    ]


class RayGpuNodes:
    """One pinned `GpuSampler` actor per GPU node; `sample()` asks all of them at once."""

    def __init__(self, nodes: list[GpuNode], *, timeout_s: float):
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        actor_class = ray.remote(GpuSampler)
        self.timeout_s = timeout_s
        self.nodes = {node.index: node for node in nodes}
        self._late: set[int] = set()  # nodes that missed a sample (reported once until they answer)
        self.actors = {
            node.index: actor_class.options(
                num_cpus=0,
                num_gpus=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False),
            ).remote()
            for node in nodes
        }

    def sample(self) -> dict[int, list[GpuReading]]:
        """{node index: readings} of the nodes that answered within `timeout_s`; a node whose
        sampler failed is reported once and dropped."""
        if not self.actors:
            return {}
        refs = {index: actor.sample.remote() for index, actor in self.actors.items()}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=self.timeout_s)
        ready = set(ready)
        readings = {}
        for index, ref in refs.items():
            if ref not in ready:
                if index not in self._late:
                    self._late.add(index)
                    self._report(index, f"did not answer within {self.timeout_s:g} s; samples skip it until it does")
                continue
            try:
                readings[index] = ray.get(ref)
            except ray.exceptions.RayError as error:
                self._report(index, f"failed, so its GPUs are no longer monitored: {_error_summary(error)}")
                ray.kill(self.actors.pop(index), no_restart=True)
                continue
            self._late.discard(index)
        return readings

    def shutdown(self) -> None:
        actors, self.actors = self.actors, {}
        if ray.is_initialized():
            for actor in actors.values():
                ray.kill(actor, no_restart=True)

    def describe(self) -> str:
        return ", ".join(
            f"node_{n.index} = {n.ip} ({n.hostname}, {n.num_gpus} GPU)" for n in self.nodes.values()
        )

    def _report(self, index: int, what: str) -> None:
        node = self.nodes[index]
        print(f"GPU monitor: node_{index} {node.ip} ({node.hostname}) {what}", file=sys.stderr, flush=True)


def start_gpu_monitor(logger, cfg: GpuMonitoringConfig) -> GpuMonitor | None:
    """Starts monitoring the Ray cluster's GPU nodes into `logger` (a `Logger`); on a cluster
    without GPUs prints one line and starts nothing (None).

    The first sample is taken here: when it fails on every node, a line says why and the run
    goes on without the monitor (None)."""
    nodes = gpu_nodes()
    if not nodes:
        print(NO_GPUS_MESSAGE, flush=True)
        return None
    samplers = RayGpuNodes(nodes, timeout_s=max(NVIDIA_SMI_TIMEOUT_S, cfg.collection_interval))
    monitor = GpuMonitor(samplers, logger.log_system_metrics, cfg)
    monitor.collect()
    if not samplers.actors:
        samplers.shutdown()
        print("logger.monitor_gpus: no GPU node could be sampled (see above); GPUs are not monitored", flush=True)
        return None
    print(
        f"GPU monitor: {samplers.describe()}; sampled every {cfg.collection_interval:g} s into the logs",
        flush=True,
    )
    # Logger.finish() closes the files: the last samples are written just before.
    logger.before_finish(monitor.stop)
    return monitor.start()


def _number_or_none(field: str) -> float | None:
    try:
        return float(field)
    except ValueError:  # "[N/A]", "[Not Supported]"
        return None


def _ip_sort_key(address: str) -> tuple:
    try:
        ip = ipaddress.ip_address(address)
        return (ip.version, int(ip))
    except ValueError:
        return (99, address)


def _error_summary(error: BaseException) -> str:
    """The last line of a Ray error: the remote exception, without its traceback."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(error).__name__
