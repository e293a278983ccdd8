"""Reserve the slots a run's workers will occupy: one placement group per node.

Node group i holds `workers_per_node` bundles, `{"GPU": 1, "CPU": k}` on GPUs or `{"CPU": k}`
on CPU, packed onto one Ray node so that the ranks of a group share a host (NVLink / shared
memory), and every node group is on a node of its own: `num_nodes=2` means two machines,
never two groups on one big machine. The reservation is made, or refused with a
`ClusterResourceError`, when the `RayVirtualCluster` is built.
"""

from __future__ import annotations

import uuid

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

# Every Ray node carries this label with its own node id (Ray >= 2.4x): a bundle selecting it
# can only be placed on that node.
_NODE_ID_LABEL = "ray.io/node-id"


class ClusterResourceError(RuntimeError):
    """The Ray cluster cannot hold the requested workers."""


class RayVirtualCluster:
    """`num_nodes` x `workers_per_node` worker slots reserved on the current Ray cluster.

    Args:
        num_nodes: node groups (placement groups), each packed onto a Ray node of its own;
            the driver's node is used first when it can hold a group.
        workers_per_node: bundles per node group, one worker each.
        use_gpus: one GPU per bundle (plus `cpus_per_worker` CPUs) instead of CPUs only.
        cpus_per_worker: CPUs per bundle; CPU workers also use this many threads.
        name: prefix of the placement-group names, "<name>-<random>-node<i>" (Ray requires
            live placement-group names to be unique, hence the random part).
        placement_timeout_s: how long to wait for resources that exist but are held by
            someone else. A request larger than the cluster's nodes fails at once.

    Raises:
        ClusterResourceError: fewer than `num_nodes` of the cluster's nodes can each hold a
            node group (at once, saying what was asked and what each node has), or the
            resources were not free within `placement_timeout_s`.

    Attributes:
        node_ids: the Ray node id of each node group, in rank order.
    """

    def __init__(
        self,
        num_nodes: int,
        workers_per_node: int,
        *,
        use_gpus: bool,
        cpus_per_worker: int = 1,
        name: str = "nemo_rl",
        placement_timeout_s: float = 30.0,
    ):
        if num_nodes < 1 or workers_per_node < 1 or cpus_per_worker < 1:
            raise ValueError(
                f"num_nodes, workers_per_node and cpus_per_worker must be >= 1; got "
                f"{num_nodes=}, {workers_per_node=}, {cpus_per_worker=}"
            )
        if not ray.is_initialized():
            raise RuntimeError("Ray is not initialised; call nemo_rl.distributed.init_ray() first")

        self.num_nodes = num_nodes
        self.workers_per_node = workers_per_node
        self.use_gpus = use_gpus
        self.cpus_per_worker = cpus_per_worker
        self.world_size = num_nodes * workers_per_node
        self.name = name
        self.bundle: dict[str, float] = (
            {"GPU": 1, "CPU": cpus_per_worker} if use_gpus else {"CPU": cpus_per_worker}
        )

        # Fail fast: a pending placement group never errors by itself, it just waits.
        nodes = _alive_nodes()
        self.node_ids = _nodes_for_groups(
            self.bundle, workers_per_node, num_nodes, nodes, driver_node_id=_driver_node_id()
        )
        if self.node_ids is None:
            able = sum(_holds_group(n["Resources"], self.bundle, workers_per_node) for n in nodes)
            raise ClusterResourceError(
                f"{self._request_text()}, each node group on a node of its own; "
                f"{able} of this Ray cluster's nodes can hold a group of {workers_per_node}. "
                f"{_describe_nodes(nodes)} Ask for fewer nodes, workers or CPUs per worker "
                "(in a run's config: cluster.num_nodes, cluster.gpus_per_node, "
                "cluster.cpu_workers_per_node), or give Ray more nodes or resources "
                "(`ray start --num-cpus/--num-gpus` on each node, slurm/ray.sub with more "
                "--nodes, init_ray(num_cpus=...) for a local cluster)."
            )
        pg_prefix = f"{name}-{uuid.uuid4().hex[:8]}"
        self._pgs: list[PlacementGroup] = [
            placement_group(
                [dict(self.bundle)] * workers_per_node,
                strategy="STRICT_PACK",
                name=f"{pg_prefix}-node{i}",
                bundle_label_selector=[{_NODE_ID_LABEL: node_id}] * workers_per_node,
            )
            for i, node_id in enumerate(self.node_ids)
        ]
        ready, _ = ray.wait(
            [pg.ready() for pg in self._pgs], num_returns=num_nodes, timeout=placement_timeout_s
        )
        if len(ready) < num_nodes:
            self.shutdown()
            raise ClusterResourceError(
                f"{self._request_text()}; that fits this Ray cluster's nodes, but the resources "
                f"were not free within {placement_timeout_s:g} s (other jobs or placement groups "
                f"hold them). Free now: {_format_resources(ray.available_resources())}. "
                f"{_describe_nodes(_alive_nodes())}"
            )

    def placement_groups(self) -> list[PlacementGroup]:
        """One ready placement group per node group, `workers_per_node` bundles each."""
        return list(self._pgs)

    def shutdown(self) -> None:
        """Release the reservation; idempotent, and safe after Ray has shut down."""
        pgs, self._pgs = self._pgs, []
        if ray.is_initialized():
            for pg in pgs:
                remove_placement_group(pg)

    def _request_text(self) -> str:
        return (
            f"Asked for {self.num_nodes} node(s) x {self.workers_per_node} worker(s) with "
            f"{_format_resources(self.bundle, keys=self.bundle)} per worker"
        )


def _alive_nodes() -> list[dict]:
    return [n for n in ray.nodes() if n["Alive"]]


def _driver_node_id() -> str:
    return ray.get_runtime_context().get_node_id()


def _holds_group(total: dict[str, float], bundle: dict[str, float], per_group: int) -> bool:
    return all(total.get(res, 0) >= amount * per_group for res, amount in bundle.items())


def _nodes_for_groups(
    bundle: dict[str, float],
    per_group: int,
    num_groups: int,
    nodes: list[dict],
    *,
    driver_node_id: str,
) -> list[str] | None:
    """The ids of `num_groups` distinct nodes that can each hold `per_group` bundles (by their
    total resources), the driver's node first, then in Ray's order; None if too few can."""
    able = [n["NodeID"] for n in nodes if _holds_group(n["Resources"], bundle, per_group)]
    able.sort(key=lambda node_id: node_id != driver_node_id)  # stable: the rest keep Ray's order
    return able[:num_groups] if len(able) >= num_groups else None


def _format_resources(resources: dict[str, float], keys=("CPU", "GPU")) -> str:
    return ", ".join(f"{k} {resources.get(k, 0):g}" for k in keys)


def _describe_nodes(nodes: list[dict]) -> str:
    """What each node has, e.g. `The cluster has 2 node(s): node1 (10.0.0.1): CPU 8, GPU 8; ...`.

    A node shows as its name (`ray start --node-name`, as slurm/ray.sub sets it) when that is
    more than its address, else as address (hostname).
    """
    lines = []
    for n in nodes:
        address = n["NodeManagerAddress"]
        name = n.get("NodeName") or address
        where = f"{name} ({address})" if name != address else f"{address} ({n['NodeManagerHostname']})"
        lines.append(f"{where}: {_format_resources(n['Resources'])}")
    return f"The cluster has {len(nodes)} node(s): " + "; ".join(lines) + "."
