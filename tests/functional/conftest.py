"""The shared Ray head (tests/conftest.py) ends with the whole runs: the tests after them
(Slurm's own clusters, the unit tests) need no idle Ray daemons beside them."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="package", autouse=True)
def _stop_the_shared_ray_head_after_the_whole_runs(shared_ray_head):
    yield
    shared_ray_head.stop()
