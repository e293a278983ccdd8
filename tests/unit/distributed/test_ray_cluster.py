"""init_ray: attach-or-start rules, temp dir placement, and what a local cluster leaves behind."""

import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import ray
from tests.unit.distributed_helpers import run_in_fresh_process

from nemo_rl.distributed import init_ray, shutdown_ray
from nemo_rl.distributed.ray_cluster import (
    _driver_pythonpath,
    _local_temp_dir,
    _running_cluster_address,
)

REPO_ROOT = str(Path(__file__).resolve().parents[3])


@pytest.fixture
def short_tmp():
    path = tempfile.mkdtemp(prefix="nrl_", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_ray_address_decides_between_attaching_and_starting(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "local")
    assert _running_cluster_address() is None
    monkeypatch.setenv("RAY_ADDRESS", "10.1.2.3:6379")
    assert _running_cluster_address() == "10.1.2.3:6379"
    monkeypatch.setenv("RAY_ADDRESS", "ray://10.1.2.3:10001")
    assert _running_cluster_address() == "ray://10.1.2.3:10001"


def test_temp_dir_is_kept_when_short_and_moved_to_tmp_when_too_long(short_tmp, caplog):
    assert _local_temp_dir(short_tmp) == short_tmp
    assert _local_temp_dir(None) is None

    too_long = os.path.join(short_tmp, "x" * 60)
    with caplog.at_level(logging.WARNING):
        fallback = _local_temp_dir(too_long)
    try:
        assert fallback.startswith("/tmp/nemo_rl_ray_") and os.path.isdir(fallback)
        assert too_long in caplog.text and fallback in caplog.text
    finally:
        os.rmdir(fallback)


def test_workers_get_the_repo_root_but_not_the_interpreters_own_dirs():
    entries = _driver_pythonpath().split(os.pathsep)
    assert entries[0] == REPO_ROOT
    assert not any("site-packages" in e for e in entries)


def _local_cluster_facts(temp_dir: str, home: str) -> dict:
    """init_ray twice in this (fresh) process, then what the cluster and its workers look like."""
    os.environ["RAY_ADDRESS"] = "local"
    os.environ["HOME"] = home  # where Ray would write ~/.ray/auth_token
    os.environ.pop("RAY_AUTH_MODE", None)
    try:
        init_ray(temp_dir, num_cpus=1)
        node_id = ray.get_runtime_context().get_node_id()
        init_ray(temp_dir, num_cpus=2)  # no-op: same cluster, same size

        @ray.remote(num_cpus=1)
        def where():
            import nemo_rl

            return sys.executable, nemo_rl.__file__, os.getcwd()

        facts = {
            "same_node": ray.get_runtime_context().get_node_id() == node_id,
            "cpus": ray.cluster_resources()["CPU"],
            "temp_dir_entries": os.listdir(temp_dir),
            "auth_mode": os.environ.get("RAY_AUTH_MODE"),
            "dashboard_url": ray._private.worker.get_dashboard_url(),
            "driver": (sys.executable, os.getcwd()),
            "worker": ray.get(where.remote()),
        }
    finally:
        shutdown_ray()
        shutdown_ray()
    facts["initialized_after_shutdown"] = ray.is_initialized()
    return facts


@pytest.mark.ray
@pytest.mark.slow  # a Ray start of its own; the fast tier starts Ray once through init_ray (`local_ray`)
def test_local_cluster_is_private_quiet_and_init_is_idempotent(short_tmp, tmp_path):
    # In a fresh process: whatever Ray another test of this session left running, init_ray
    # starts its own here, so the test always runs and checks a cluster it started.
    facts = run_in_fresh_process(_local_cluster_facts, short_tmp, str(tmp_path))
    assert facts["same_node"]
    assert facts["cpus"] == 1
    assert "session_latest" in facts["temp_dir_entries"]
    assert not (tmp_path / ".ray" / "auth_token").exists()
    assert facts["auth_mode"] == "disabled"
    assert facts["dashboard_url"] == ""  # no dashboard web server
    assert facts["initialized_after_shutdown"] is False

    # Same interpreter and checkout as the driver (not a `uv run` copy of the cwd).
    executable, package_file, cwd = facts["worker"]
    assert (executable, cwd) == facts["driver"] and executable == sys.executable
    assert package_file.startswith(REPO_ROOT)


def _fake_ray_start(monkeypatch, outcomes):
    """ray.init replaced: each call takes the next outcome; an exception outcome first leaves a
    child process behind, as a half-started local node does."""
    import subprocess

    from nemo_rl.distributed import ray_cluster

    calls, leftovers = [], []

    def fake_init(**kwargs):
        calls.append(kwargs)
        outcome = outcomes[len(calls) - 1]
        if isinstance(outcome, Exception):
            leftovers.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"]))
            raise outcome

    monkeypatch.setattr(ray_cluster.ray, "init", fake_init)
    monkeypatch.setattr(ray_cluster.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray_cluster, "_running_cluster_address", lambda: None)
    return calls, leftovers


STARTUP_TIMEOUT = Exception("The current node timed out during startup. This could happen because ...")


def test_a_local_start_that_times_out_is_cleaned_up_and_retried(monkeypatch, caplog):
    calls, leftovers = _fake_ray_start(monkeypatch, [STARTUP_TIMEOUT, None])
    with caplog.at_level(logging.WARNING, logger="nemo_rl.distributed.ray_cluster"):
        init_ray(num_cpus=2)
    assert len(calls) == 2 and calls[0] == calls[1] and calls[1]["num_cpus"] == 2
    assert leftovers[0].wait(timeout=10) == -9  # the half-started node's process was killed
    assert "starting it again (attempt 2 of 3)" in caplog.text


def test_other_start_failures_and_the_last_timeout_are_raised(monkeypatch):
    from nemo_rl.distributed.ray_cluster import LOCAL_START_ATTEMPTS

    calls, _ = _fake_ray_start(monkeypatch, [ValueError("bad argument")])
    with pytest.raises(ValueError, match="bad argument"):
        init_ray()
    assert len(calls) == 1
    calls, leftovers = _fake_ray_start(monkeypatch, [STARTUP_TIMEOUT] * LOCAL_START_ATTEMPTS)
    with pytest.raises(Exception, match="timed out during startup"):
        init_ray()
    assert len(calls) == LOCAL_START_ATTEMPTS
    for process in leftovers:
        process.kill()
        process.wait()
