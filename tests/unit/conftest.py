"""`local_ray`: one private 2-CPU Ray cluster for the unit tests that need one.

Started on first use and kept for the rest of the session, so the Ray tests of several modules
pay for one Ray start (seconds each on a small machine), not one each. A test that needs a Ray
of its own (a multi-node `ray.cluster_utils.Cluster`) shuts this one down first; the next module
that asks for `local_ray` then starts it again.
"""

from __future__ import annotations

import pytest

from nemo_rl.distributed import init_ray, shutdown_ray


@pytest.fixture(scope="session")
def _ray_temp_dir(tmp_path_factory):
    yield str(tmp_path_factory.mktemp("ray"))
    shutdown_ray()


@pytest.fixture(scope="module")
def local_ray(_ray_temp_dir):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_ADDRESS", "local")  # a private cluster, even next to a `ray start` one
        init_ray(_ray_temp_dir, num_cpus=2)  # a no-op while the session's cluster runs
    yield
