"""A real Slurm cluster of two emulated nodes on this one machine, for the tests of slurm/ray.sub.

Debian's Slurm (`apt-get install slurmctld slurmd slurm-client munge`, done by .ci/run) runs in
its multiple-slurmd mode: two `NodeName`s on 127.0.0.1, each with its own slurmd port, spool
dir, pid and log file, each slurmd started as `slurmd -N <node>`. Everything the cluster
writes lives in one fresh dir, its ports are free ones and its config is reached through
`SLURM_CONF`, so the machine's own /etc/slurm and anyone else's daemons are left alone. The
daemons run in the foreground as children of this process, and `stop()` ends each by its pid.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

NODES = ("node1", "node2")
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "sinfo", "scancel")
STOP_GRACE_S = 15.0


def missing_programs() -> list[str]:
    return [p for p in DAEMONS if shutil.which(p) is None]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class SlurmCluster:
    """munged, slurmctld and one slurmd per node in `NODES`, each node with `cpus_per_node` CPUs."""

    def __init__(self, cpus_per_node: int = 1):
        # Short and world-traversable: munged (as the munge user) must reach its socket here.
        self.root = Path(tempfile.mkdtemp(prefix="nrl-slurm-", dir="/tmp"))
        self.root.chmod(0o755)
        self.cpus_per_node = cpus_per_node
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._daemons: list[tuple[str, subprocess.Popen]] = []

    # ------------------------------------------------------------ start and stop

    def start(self, timeout: float = 120) -> None:
        self._start_munged()
        self._write_conf()
        self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        for node in NODES:
            self._spawn(f"slurmd {node}", ["slurmd", "-D", "-N", node, "-f", str(self.conf)])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_daemons()
            states = self._run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False).stdout.split()
            if states and all(state == "idle" for state in states[1::2]) and len(states) == 2 * len(NODES):
                return
            time.sleep(1)
        raise RuntimeError(f"the Slurm nodes did not become idle within {timeout} s: {states}\n{self.logs_tail()}")

    def stop(self) -> None:
        """Cancels every job of this cluster, waits for them to end, then stops each daemon by pid."""
        if any(name == "slurmctld" and proc.poll() is None for name, proc in self._daemons):
            self._run(["scancel", "--full", "--user", pwd.getpwuid(os.getuid()).pw_name], check=False)
            deadline = time.monotonic() + 60
            while self.active_jobs() and time.monotonic() < deadline:
                time.sleep(1)
        daemons, self._daemons = self._daemons, []
        for _, proc in reversed(daemons):  # slurmd before slurmctld before munged
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    # ------------------------------------------------------------ jobs

    def sbatch(self, script: Path, *args: str, env: dict[str, str], cwd: Path) -> int:
        """Submits `script` with `env` on top of the cluster's; returns the job id."""
        out = self._run(["sbatch", "--parsable", *args, str(script)], env={**self.env, **env}, cwd=cwd)
        return int(out.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, NodeList, ...); {} once forgotten."""
        out = self._run(["scontrol", "show", "job", "-o", str(job_id)], check=False).stdout
        return dict(field.split("=", 1) for field in out.split() if "=" in field)

    def wait_for_job(self, job_id: int, timeout: float) -> dict[str, str]:
        """The job's fields once it has ended (any state other than pending, running, ...)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_daemons()
            info = self.job(job_id)
            if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                return info
            time.sleep(1)
        raise TimeoutError(f"job {job_id} did not end within {timeout} s: {self.job(job_id)}")

    def active_jobs(self) -> list[str]:
        return self._run(["squeue", "-h", "-o", "%i"], check=False).stdout.split()

    def logs_tail(self, lines: int = 30) -> str:
        tails = []
        for log in sorted(self.root.glob("*.log")):
            tails.append(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(tails)

    # ------------------------------------------------------------ setup

    def _start_munged(self) -> None:
        """munged as the munge user (it refuses root), with a key of our own and its socket in our dir."""
        munge = pwd.getpwnam("munge")
        munge_dir = self.root / "munge"
        munge_dir.mkdir(mode=0o755)  # clients must reach the socket; munged checks this
        key = munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        for path in (munge_dir, key):
            os.chown(path, munge.pw_uid, munge.pw_gid)
        self.munge_socket = munge_dir / "munge.socket"
        self._spawn(
            "munged",
            [
                # setpriv execs munged itself, so the pid we hold is munged's.
                "setpriv", f"--reuid={munge.pw_uid}", f"--regid={munge.pw_gid}", "--init-groups",
                "munged", "--foreground", f"--socket={self.munge_socket}",
                f"--key-file={key}", f"--pid-file={munge_dir / 'munged.pid'}",
                f"--log-file={munge_dir / 'munged.log'}", f"--seed-file={munge_dir / 'munged.seed'}",
            ],
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while not self.munge_socket.exists():
            self._check_daemons()
            if time.monotonic() > deadline:
                raise RuntimeError(f"munged did not create {self.munge_socket} within 30 s")
            time.sleep(0.1)

    def _write_conf(self) -> None:
        hostname = socket.gethostname().split(".")[0]
        node_lines = "\n".join(
            f"NodeName={node} NodeHostname={hostname} NodeAddr=127.0.0.1 Port={free_port()} "
            f"CPUs={self.cpus_per_node} State=UNKNOWN"
            for node in NODES
        )
        (self.root / "state").mkdir()
        (self.root / "spool").mkdir()
        self.conf.write_text(
            f"""\
ClusterName=nrltest
SlurmctldHost={hostname}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
CredType=cred/munge
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool/%n
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd-%n.pid
SlurmctldLogFile={self.root}/slurmctld.log
SlurmdLogFile={self.root}/slurmd-%n.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
KillWait=10
MinJobAge=600
MessageTimeout=60
SlurmdTimeout=300
{node_lines}
PartitionName=debug Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
"""
        )

    def _spawn(self, name: str, command: list[str]) -> None:
        log = open(self.root / f"{name.replace(' ', '-')}.out.log", "w")
        proc = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        self._daemons.append((name, proc))

    def _check_daemons(self) -> None:
        for name, proc in self._daemons:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with status {proc.returncode}\n{self.logs_tail()}")

    def _run(self, command: list[str], *, check: bool = True, env=None, cwd=None) -> subprocess.CompletedProcess:
        result = subprocess.run(command, env=env or self.env, cwd=cwd, capture_output=True, text=True, timeout=120)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr}{result.stdout}")
        return result


@contextlib.contextmanager
def slurm_cluster(cpus_per_node: int = 1):
    cluster = SlurmCluster(cpus_per_node)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        cluster.remove()
