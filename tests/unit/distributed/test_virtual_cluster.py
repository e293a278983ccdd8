"""RayVirtualCluster: bundles per node, node groups on distinct nodes, and a clear, fast error
when the cluster is too small. (Placement over two real Ray nodes: tests/functional/test_multinode.py.)"""

import pytest
import ray

from nemo_rl.distributed import ClusterResourceError, RayVirtualCluster, virtual_cluster
from nemo_rl.distributed.virtual_cluster import _describe_nodes, _nodes_for_groups


def _node(node_id, **resources):
    return {"NodeID": node_id, "Resources": resources}


def test_each_node_group_gets_a_node_of_its_own_the_drivers_first():
    nodes = [_node("a", CPU=4, GPU=2), _node("b", CPU=2), _node("c", CPU=8)]

    def pick(bundle, per_group, groups, driver="x"):
        return _nodes_for_groups(bundle, per_group, groups, nodes, driver_node_id=driver)

    # A node that could hold two groups still holds one: 3 groups need 3 nodes.
    assert pick({"CPU": 2}, 1, 3) == ["a", "b", "c"]
    assert pick({"CPU": 2}, 1, 4) is None
    assert pick({"CPU": 2}, 2, 2) == ["a", "c"]  # b holds 2 CPUs, not 4
    assert pick({"CPU": 2}, 2, 2, driver="c") == ["c", "a"]  # the driver's node first
    assert pick({"GPU": 1, "CPU": 1}, 2, 1) == ["a"]
    assert pick({"GPU": 1, "CPU": 1}, 1, 2) is None  # one node has GPUs


def test_nodes_are_described_by_name_when_they_have_one():
    nodes = [
        {"NodeManagerAddress": "10.0.0.1", "NodeManagerHostname": "h1", "NodeName": "node1", "Resources": {"CPU": 8, "GPU": 8}},
        {"NodeManagerAddress": "10.0.0.2", "NodeManagerHostname": "h2", "NodeName": "10.0.0.2", "Resources": {"CPU": 4}},
    ]
    assert _describe_nodes(nodes) == (
        "The cluster has 2 node(s): node1 (10.0.0.1): CPU 8, GPU 8; 10.0.0.2 (h2): CPU 4, GPU 0."
    )


def test_rejects_empty_requests():
    with pytest.raises(ValueError, match="workers_per_node"):
        RayVirtualCluster(1, 0, use_gpus=False)


@pytest.mark.ray
def test_one_strict_pack_group_on_the_drivers_node_and_idempotent_shutdown(local_ray):
    cluster = RayVirtualCluster(1, 2, use_gpus=False)
    assert cluster.world_size == 2 and not cluster.use_gpus
    assert cluster.node_ids == [ray.get_runtime_context().get_node_id()]
    pgs = cluster.placement_groups()
    assert [pg.bundle_specs for pg in pgs] == [[{"CPU": 1.0}, {"CPU": 1.0}]]
    cluster.shutdown()
    cluster.shutdown()
    assert cluster.placement_groups() == []


def _no_placement_group(*args, **kwargs):
    raise AssertionError("a request that cannot fit must fail before reserving (and waiting for) anything")


@pytest.mark.ray
def test_two_node_groups_on_a_one_node_cluster_fail_fast_though_its_cpus_would_hold_both(local_ray, monkeypatch):
    # Fast: refused from the nodes' totals, with no placement group to wait the timeout for.
    monkeypatch.setattr(virtual_cluster, "placement_group", _no_placement_group)
    with pytest.raises(ClusterResourceError) as info:
        RayVirtualCluster(2, 1, use_gpus=False, placement_timeout_s=60)
    message = str(info.value)
    assert "Asked for 2 node(s) x 1 worker(s) with CPU 1 per worker, each node group on a node of its own" in message
    assert "1 of this Ray cluster's nodes can hold a group of 1" in message
    assert "The cluster has 1 node(s)" in message and "CPU 2, GPU 0" in message
    assert "cluster.num_nodes" in message


@pytest.mark.ray
def test_too_large_a_request_fails_fast_saying_what_was_asked_and_what_exists(local_ray, monkeypatch):
    monkeypatch.setattr(virtual_cluster, "placement_group", _no_placement_group)
    with pytest.raises(ClusterResourceError) as info:
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
