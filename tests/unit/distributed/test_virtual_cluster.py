"""RayVirtualCluster: bundles per node, and a clear, fast error when the cluster is too small."""

import pytest

from nemo_rl.distributed import ClusterResourceError, RayVirtualCluster, virtual_cluster
from nemo_rl.distributed.virtual_cluster import _fits


def test_fits_counts_whole_node_groups_per_node():
    two_nodes = [{"CPU": 4, "GPU": 2}, {"CPU": 2}]
    assert _fits({"CPU": 2}, per_group=1, num_groups=3, nodes=two_nodes)  # 2 + 1 groups
    assert not _fits(
        {"CPU": 2}, per_group=2, num_groups=2, nodes=two_nodes
    )  # only node 0 holds 4 CPU
    assert _fits({"GPU": 1, "CPU": 1}, per_group=2, num_groups=1, nodes=two_nodes)
    assert not _fits({"GPU": 1, "CPU": 1}, per_group=1, num_groups=3, nodes=two_nodes)


def test_rejects_empty_requests():
    with pytest.raises(ValueError, match="workers_per_node"):
        RayVirtualCluster(1, 0, use_gpus=False)


@pytest.mark.ray
def test_one_strict_pack_group_per_node_and_idempotent_shutdown(local_ray):
    cluster = RayVirtualCluster(2, 1, use_gpus=False)  # both groups fit on the one node
    assert cluster.world_size == 2 and not cluster.use_gpus
    pgs = cluster.placement_groups()
    assert [pg.bundle_specs for pg in pgs] == [[{"CPU": 1.0}], [{"CPU": 1.0}]]
    cluster.shutdown()
    cluster.shutdown()
    assert cluster.placement_groups() == []


def _no_placement_group(*args, **kwargs):
    raise AssertionError("a request that cannot fit must fail before reserving (and waiting for) anything")


@pytest.mark.ray
def test_too_large_a_request_fails_fast_saying_what_was_asked_and_what_exists(local_ray, monkeypatch):
    # Fast: refused from the cluster's totals, with no placement group to wait the timeout for.
    monkeypatch.setattr(virtual_cluster, "placement_group", _no_placement_group)
    with pytest.raises(ClusterResourceError, match="does not fit on this Ray cluster") as info:
        RayVirtualCluster(1, 3, use_gpus=False, placement_timeout_s=60)
    message = str(info.value)
    assert "1 node(s) x 3 worker(s) with CPU 1 per worker" in message
    assert "1 node(s)" in message and "CPU 2, GPU 0" in message

    with pytest.raises(ClusterResourceError, match="GPU 1, CPU 1 per worker"):
        RayVirtualCluster(1, 1, use_gpus=True, placement_timeout_s=60)


@pytest.mark.ray
def test_resources_held_by_others_time_out_and_release_the_partial_reservation(local_ray):
    holder = RayVirtualCluster(1, 2, use_gpus=False)
    try:
        with pytest.raises(ClusterResourceError, match="not free within 0.5 s.*Free now: CPU 0"):
            RayVirtualCluster(1, 1, use_gpus=False, placement_timeout_s=0.5)
    finally:
        holder.shutdown()
    # Nothing of the failed request is left pending: the whole cluster can be reserved again.
    again = RayVirtualCluster(1, 2, use_gpus=False, placement_timeout_s=10)
    again.shutdown()
