"""A Ray cluster of several `ray start` nodes on this one machine, as on a real multi-node cluster.

Each node is one `ray start` with its own temp dir, node name and resources; the head listens
on free ports (never Ray's default 6379, which other people's clusters on a shared machine
may hold), and a driver attaches with `RAY_ADDRESS=<address>`. Each `ray start` runs in a
session of its own, which its daemons and the workers their raylets start stay in (process
groups do not: Ray makes some of its own), so `stop()` ends exactly the processes of these
nodes, by pid, and never anyone else's Ray: no `ray stop`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")
STOP_GRACE_S = 5.0  # for Ray's daemons to end on SIGTERM; SIGKILL after it (gcs_server often hangs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class RayNodes:
    """Ray nodes started by `start_head` and `add_node`; `address` is the head's GCS address."""

    def __init__(self, root: Path):
        self.root = root
        self.address: str | None = None
        self.temp_dirs: dict[str, Path] = {}  # node name -> its Ray temp dir
        self._sessions: set[int] = set()  # the session of each `ray start`: its pid
        self._env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
        self._env.pop("RAY_ADDRESS", None)

    def start_head(self, name: str, *, num_cpus: int) -> None:
        port = free_port()
        head_options = (
            "--head",
            f"--port={port}",
            f"--ray-client-server-port={free_port()}",
            "--include-dashboard=false",
            f"--dashboard-port={free_port()}",
        )
        self._ray_start(name, *head_options, num_cpus=num_cpus)
        # `ray start` records the address it chose for the head (its node IP and our port).
        self.address = (self.temp_dirs[name] / "ray_current_cluster").read_text().strip()
        assert self.address.endswith(f":{port}"), self.address

    def add_node(self, name: str, *, num_cpus: int) -> None:
        self._ray_start(name, f"--address={self.address}", num_cpus=num_cpus)

    def stop(self) -> None:
        """Ends every process of every node started here: SIGTERM, then SIGKILL after a grace."""
        sessions, self._sessions = self._sessions, set()
        _end_sessions(sessions)

    def worker_log_exists(self, node: str, pid: int) -> bool:
        """Whether the node's raylet started the worker process `pid` (Ray names each worker's
        log files after its pid: logs/worker-<id>-<job>-<pid>.out)."""
        logs = self.temp_dirs[node] / "session_latest" / "logs"
        return any(logs.glob(f"worker-*-{pid}.out"))

    def _ray_start(self, name: str, *options: str, num_cpus: int, attempts: int = 3) -> None:
        """One `ray start`, retried: under load a raylet, the head's too, can miss Ray's 30 s
        start-up deadline. A failed attempt's processes are ended before the next one."""
        temp_dir = self.root / name
        self.temp_dirs[name] = temp_dir
        command = [
            RAY, "start", *options,
            f"--temp-dir={temp_dir}",
            f"--node-name={name}",
            f"--num-cpus={num_cpus}",
            "--num-gpus=0",
            "--dashboard-agent-listen-port=0",  # a free one: two nodes share this machine
            "--disable-usage-stats",
        ]  # fmt: skip
        log = self.root / f"ray-start-{name}.log"
        for attempt in range(1, attempts + 1):
            with open(log, "a") as out:
                proc = subprocess.Popen(command, env=self._env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            self._sessions.add(proc.pid)
            try:
                rc = proc.wait(timeout=300)
            except subprocess.TimeoutExpired:
                rc = None
            if rc == 0:
                return
            self._sessions.discard(proc.pid)
            _end_sessions({proc.pid})
            if attempt == attempts:
                raise RuntimeError(f"{' '.join(command)} failed {attempts} times; its output:\n{log.read_text()[-4000:]}")


def _end_sessions(sessions: set[int]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in processes_in_sessions(sessions):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + STOP_GRACE_S
        while processes_in_sessions(sessions) and time.monotonic() < deadline:
            time.sleep(0.2)


def processes_in_sessions(sessions: set[int]) -> list[int]:
    """The pids of the live processes in these sessions (zombies left out: they are dead)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            # After the command name (which may hold spaces and parentheses): state ppid pgrp session
            state, _, _, session = stat.read_text().rsplit(")", 1)[1].split()[:4]
            if int(session) in sessions and state != "Z":
                pids.append(int(stat.parent.name))
    return pids


@contextlib.contextmanager
def ray_nodes(root: Path, cpus_per_node: dict[str, int]) -> Iterator[RayNodes]:
    """A head (the first name) and the other nodes, stopped on exit whatever happened."""
    nodes = RayNodes(root)
    try:
        names = iter(cpus_per_node.items())
        head, cpus = next(names)
        nodes.start_head(head, num_cpus=cpus)
        for name, cpus in names:
            nodes.add_node(name, num_cpus=cpus)
        yield nodes
    finally:
        nodes.stop()


class SharedRayHead:
    """One `ray start --head` that the whole runs ending on their own attach to
    (`RAY_ADDRESS`, `env`), started on first use: each run then pays for its workers, not
    also for a Ray start of its own (GCS, raylet, agents and the raylet's prestarted idle
    workers: tens of seconds on a loaded 2-core machine).

    A run that kills its driver or its Ray processes needs a cluster of its own instead:
    what it kills must not be this one. `stop()` may be called early (the next `env` starts
    a new head), so that an idle head does not tax the tests after the runs.
    """

    def __init__(self, root: Path, *, num_cpus: int):
        self._root = root
        self._num_cpus = num_cpus
        self._nodes: RayNodes | None = None

    @property
    def env(self) -> dict[str, str]:
        """The environment on top of the run's own that attaches it to this head."""
        if self._nodes is None:
            nodes = RayNodes(self._root)
            try:
                nodes.start_head("shared", num_cpus=self._num_cpus)
            except BaseException:
                nodes.stop()
                raise
            self._nodes = nodes
        return {"RAY_ADDRESS": self._nodes.address}

    def stop(self) -> None:
        if self._nodes is not None:
            nodes, self._nodes = self._nodes, None
            nodes.stop()
