"""Start or attach to the Ray cluster a run uses.

`init_ray()` attaches to a running cluster when there is one to attach to (``RAY_ADDRESS``,
or the cluster of the last ``ray start`` on this machine, as under Slurm) and otherwise starts
a private local cluster: no dashboard, no usage stats, no auth-token file, Ray's own logging
at WARNING, its temp dir under the run's log dir when the path is short enough for Ray's
unix sockets.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
from pathlib import Path

import ray

logger = logging.getLogger(__name__)

# Linux limits a unix-socket path to 107 bytes. Ray puts its sockets at
# <temp_dir>/session_<date>_<time>_<usec>_<pid>/sockets/plasma_store[.N]; this is the
# longest such suffix (7-digit pid, a two-digit index), so temp_dir + it must fit.
_MAX_UNIX_SOCKET_PATH = 107
_RAY_SOCKET_SUFFIX = "/session_2000-01-01_00-00-00_000000_9999999/sockets/plasma_store.99"

LOCAL_START_ATTEMPTS = 3
_STARTUP_TIMEOUT = "timed out during startup"


def init_ray(temp_dir: str | None = None, *, num_cpus: int | None = None) -> None:
    """Connect this driver to Ray; a no-op when Ray is already initialised.

    Args:
        temp_dir: where a *local* cluster keeps its sessions and logs (e.g. under the run's
            log dir). Ignored when attaching: the running cluster already has one. When the
            path is too long for Ray's unix sockets, a short dir under /tmp is used instead
            and its path is logged. None: Ray's default (/tmp/ray).
        num_cpus: logical CPUs a local cluster declares (default: the machine's cores).
            Ignored when attaching.
    """
    if ray.is_initialized():
        return
    _keep_workers_on_driver_interpreter()

    # Workers import our package (and the driver's own modules, e.g. tests) by the same
    # paths as the driver; the job-level runtime_env applies to every worker of this job.
    common = dict(
        runtime_env={"env_vars": {"PYTHONPATH": _driver_pythonpath()}},
        logging_level=logging.WARNING,
        log_to_driver=True,  # worker prints and warnings still reach the console
    )

    address = _running_cluster_address()
    if address is not None:
        if num_cpus is not None or temp_dir is not None:
            logger.info("Attaching to Ray at %s; num_cpus/temp_dir are the cluster's own.", address)
        ray.init(address=address, **common)
        return

    # Local cluster: no auth token file (~/.ray/auth_token) and no usage reporting unless
    # the user asked for them. Set in os.environ because Ray's processes inherit it.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    local = dict(address="local", num_cpus=num_cpus, include_dashboard=False, _temp_dir=_local_temp_dir(temp_dir), **common)
    for attempt in range(1, LOCAL_START_ATTEMPTS + 1):
        children_before = _child_pids()
        try:
            ray.init(**local)
            return
        except Exception as error:  # Ray raises a bare Exception for this
            if _STARTUP_TIMEOUT not in str(error) or attempt == LOCAL_START_ATTEMPTS:
                raise
            # Ray waits a fixed 30 s for its raylet to register; a loaded machine can take
            # longer. The half-started cluster's processes are this driver's children.
            _kill(_child_pids() - children_before)
            logger.warning(
                "Ray's local node did not register within Ray's 30 s (a loaded machine?); starting it again "
                "(attempt %d of %d)", attempt + 1, LOCAL_START_ATTEMPTS,
            )


def _child_pids() -> set[int]:
    """This process's direct children (from /proc; empty where there is none)."""
    me, children = os.getpid(), set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid ...": comm may hold spaces, so split after its ")".
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me:
            children.add(int(stat.parent.name))
    return children


def _kill(pids: set[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def shutdown_ray() -> None:
    """Disconnect from Ray (and stop the local cluster if `init_ray` started one)."""
    if ray.is_initialized():
        ray.shutdown()


def _keep_workers_on_driver_interpreter() -> None:
    """Stop Ray from re-creating a `uv run` driver's environment for its workers.

    By default a driver started with `uv run` makes Ray upload a copy of the current dir as
    the workers' working_dir and run them under `uv run` there: a new venv per session,
    a size-limited upload, and workers whose relative paths (checkpoints, data) point into
    that copy. Workers run the driver's interpreter instead (same venv, shared FS on
    multi-node clusters). An explicit RAY_ENABLE_UV_RUN_RUNTIME_ENV from the user wins.
    """
    if "RAY_ENABLE_UV_RUN_RUNTIME_ENV" in os.environ:
        return
    from ray._private import ray_constants

    # Ray reads the variable once, when it is imported, so the constant is set as well.
    os.environ["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"
    ray_constants.RAY_ENABLE_UV_RUN_RUNTIME_ENV = False


def _running_cluster_address() -> str | None:
    """The cluster to attach to, or None to start a local one.

    This is Ray's own rule for ``ray.init()`` with no address: ``RAY_ADDRESS`` if set
    (``RAY_ADDRESS=local`` forces a new local cluster), else the address recorded by the last
    ``ray start`` on this machine. Unlike ``address="auto"``, it never picks up some other
    process's private ``ray.init()`` cluster that happens to run on the same machine.
    """
    env_address = os.environ.get("RAY_ADDRESS", "")
    if "://" in env_address:  # Ray Client (ray://head:10001): Ray connects to it as given
        return env_address
    from ray._private.services import canonicalize_bootstrap_address

    return canonicalize_bootstrap_address(None)


def _local_temp_dir(temp_dir: str | None) -> str | None:
    """`temp_dir` as an absolute path, or a short dir under /tmp when it is too long."""
    if temp_dir is None:
        return None
    path = os.path.abspath(os.path.expanduser(temp_dir))
    if len((path + _RAY_SOCKET_SUFFIX).encode()) <= _MAX_UNIX_SOCKET_PATH:
        os.makedirs(path, exist_ok=True)
        return path
    short = tempfile.mkdtemp(prefix="nemo_rl_ray_", dir="/tmp")
    logger.warning(
        "Ray temp dir %s is too long for Ray's unix sockets (limit %d bytes); "
        "Ray's session and logs are in %s instead.",
        path,
        _MAX_UNIX_SOCKET_PATH,
        short,
    )
    return short


def _driver_pythonpath() -> str:
    """PYTHONPATH for workers: the repo root, the driver's extra sys.path dirs, $PYTHONPATH.

    The interpreter's own dirs (stdlib, the venv's site-packages) are left out: workers run
    the same interpreter and find those anyway.
    """
    repo_root = str(Path(__file__).resolve().parents[2])  # .../<repo>/nemo_rl/distributed
    interpreter_dirs = tuple({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix)})
    entries = [repo_root]
    for p in sys.path:
        if not p or not os.path.isdir(p):
            continue
        p = os.path.realpath(p)
        if not any(p == d or p.startswith(d + os.sep) for d in interpreter_dirs):
            entries.append(p)
    entries += [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join(dict.fromkeys(entries))  # de-duplicated, order kept
