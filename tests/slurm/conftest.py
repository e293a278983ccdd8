"""The Slurm cluster the tests of slurm/ray.sub submit to, started once per session."""

from __future__ import annotations

import os

import pytest

from tests.slurm.slurm_cluster import missing_programs, slurm_cluster


@pytest.fixture(scope="session")
def slurm():
    missing = missing_programs()
    if missing:
        reason = f"Slurm is not installed here (no {', '.join(missing)}); .ci/run installs it with apt-get"
        if os.environ.get("NEMO_RL_REQUIRE_SLURM") == "1":  # .ci/run installed it: missing is a failure
            pytest.fail(reason)
        pytest.skip(reason)
    with slurm_cluster(cpus_per_node=1) as cluster:
        yield cluster
