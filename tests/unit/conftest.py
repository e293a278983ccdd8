"""`local_ray`: one private 2-CPU Ray cluster for every unit test that needs one.

Started on first use and shut down at the end of the session, so the Ray tests of several
modules pay for one Ray start (seconds each on a small machine), not one each.
"""

from __future__ import annotations

import pytest

from nemo_rl.distributed import init_ray, shutdown_ray


@pytest.fixture(scope="session")
def local_ray(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_ADDRESS", "local")  # a private cluster, even next to a `ray start` one
        init_ray(str(tmp_path_factory.mktemp("ray")), num_cpus=2)
    yield
    shutdown_ray()
