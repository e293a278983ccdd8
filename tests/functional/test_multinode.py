"""Two Ray nodes on this machine (two `ray start`s with their own temp dirs, as on two hosts),
no Slurm: `cluster.num_nodes=2` puts a worker on each node and trains as the single-node run
on as many workers does; asking for more nodes than the cluster has fails at once, saying what
each node has. (The same through Slurm's sbatch and slurm/ray.sub: tests/slurm/.)
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import pytest

from tests.functional.ray_nodes import RayNodes, ray_nodes
from tests.functional.sft_runs import (
    TOTAL_STEPS,
    assert_hf_loads_with_weights_of,
    run_args,
    run_to_end,
    started,
    step_metrics,
    worker_pids,
)

# Run alone, the first test also makes the session's reference run and starts the two nodes.
pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def two_nodes() -> RayNodes:
    # Short: Ray's unix sockets live under each node's temp dir.
    root = Path(tempfile.mkdtemp(prefix="nrl-nodes-", dir="/tmp"))
    try:
        with ray_nodes(root, {"node1": 1, "node2": 1}) as nodes:
            yield nodes
    finally:
        shutil.rmtree(root, ignore_errors=True)


def assert_same_run(metrics: dict[int, tuple[float, float]], reference: dict[int, tuple[float, float]]) -> None:
    """Same steps, same batches (valid tokens) and losses to fp32 error (1e-5 relative)."""
    assert sorted(metrics) == sorted(reference) == list(range(1, TOTAL_STEPS + 1))
    for step, (loss, tokens) in metrics.items():
        assert tokens == reference[step][1], step
        assert loss == pytest.approx(reference[step][0], rel=1e-5), (step, loss, reference[step][0])


def test_two_nodes_one_worker_each_train_as_one_node_with_two_workers(tmp_path, reference_run, two_nodes):
    overrides = run_args(
        tmp_path,
        reference_run.data_dir,
        "cluster.num_nodes=2",
        "cluster.cpu_workers_per_node=1",
        "checkpointing.save_period=100",  # the final checkpoint only: saves cost time here
    )
    rc, output = run_to_end(overrides, tmp_path / "output.txt", env={"RAY_ADDRESS": two_nodes.address})
    assert rc == 0, output[-4000:]

    # Rank 0 on the driver's node (the head), rank 1 on the other: each node's raylet started it.
    pids = worker_pids(output)
    assert two_nodes.worker_log_exists("node1", pids[0]), output[-2000:]
    assert two_nodes.worker_log_exists("node2", pids[1]), output[-2000:]

    assert_same_run(step_metrics(tmp_path / "logs"), reference_run.metrics)
    final = f"step_{TOTAL_STEPS}"
    assert_hf_loads_with_weights_of(tmp_path / "ckpt" / final, reference_run.ckpt_dir / final)


def test_three_nodes_asked_of_a_two_node_cluster_fail_at_once_saying_what_each_node_has(
    tmp_path, reference_run, two_nodes
):
    overrides = run_args(
        tmp_path,
        reference_run.data_dir,
        "cluster.num_nodes=3",
        "cluster.cpu_workers_per_node=1",
        "policy.train_global_batch_size=24",  # splits over 3 workers
    )
    with started(overrides, tmp_path / "output.txt", env={"RAY_ADDRESS": two_nodes.address}) as run:
        run.wait_for(r"\| cluster +\| 3 node")  # the header; then data, Ray, the placement
        header_at = time.monotonic()
        rc, output = run.finish(timeout=120), run.output
    # The request is refused as soon as it is made, not after the 30 s placement timeout.
    assert time.monotonic() - header_at < 25, output[-4000:]
    assert rc == 1, output[-4000:]
    assert "error (ClusterResourceError): Asked for 3 node(s) x 1 worker(s) with CPU 1 per worker" in output
    assert "2 of this Ray cluster's nodes can hold a group of 1" in output
    assert "The cluster has 2 node(s)" in output
    assert "node1 (" in output and "node2 (" in output and "CPU 1, GPU 0" in output
    assert "cluster.num_nodes" in output
    assert "policy workers:" not in output and "Traceback" not in output
