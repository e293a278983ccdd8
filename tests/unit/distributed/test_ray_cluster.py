"""init_ray: attach-or-start rules, temp dir placement, and what a local cluster leaves behind."""

import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import ray

from nemo_rl.distributed import init_ray, shutdown_ray
from nemo_rl.distributed.ray_cluster import (
    _driver_pythonpath,
    _local_temp_dir,
    _running_cluster_address,
)

REPO_ROOT = str(Path(__file__).resolve().parents[3])


@pytest.fixture
def restore_environ():
    """init_ray sets RAY_AUTH_MODE etc. in os.environ on purpose; undo it after the test."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


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


@pytest.mark.ray
def test_local_cluster_is_private_quiet_and_init_is_idempotent(
    short_tmp, tmp_path, monkeypatch, restore_environ
):
    monkeypatch.setenv("RAY_ADDRESS", "local")
    monkeypatch.setenv("HOME", str(tmp_path))  # where Ray would write ~/.ray/auth_token
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    if ray.is_initialized():
        pytest.skip("needs a fresh Ray; another test left one running in this process")
    try:
        init_ray(short_tmp, num_cpus=1)
        node_id = ray.get_runtime_context().get_node_id()
        init_ray(short_tmp, num_cpus=2)  # no-op: same cluster, same size
        assert ray.get_runtime_context().get_node_id() == node_id
        assert ray.cluster_resources()["CPU"] == 1

        assert "session_latest" in os.listdir(short_tmp)
        assert not (tmp_path / ".ray" / "auth_token").exists()
        assert os.environ["RAY_AUTH_MODE"] == "disabled"
        assert ray._private.worker.get_dashboard_url() == ""  # no dashboard web server

        @ray.remote(num_cpus=1)
        def where():
            import nemo_rl

            return sys.executable, nemo_rl.__file__, os.getcwd()

        # Same interpreter and checkout as the driver (not a `uv run` copy of the cwd).
        executable, package_file, cwd = ray.get(where.remote())
        assert executable == sys.executable
        assert package_file.startswith(REPO_ROOT) and cwd == os.getcwd()
    finally:
        shutdown_ray()
        shutdown_ray()
    assert not ray.is_initialized()
