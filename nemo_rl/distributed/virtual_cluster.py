"""Reserve the slots a run's workers will occupy: one placement group per node.

Node group i holds `workers_per_node` bundles, `{"GPU": 1, "CPU": k}` on GPUs or `{"CPU": k}`
on CPU, packed STRICT_PACK onto one physical node so that the ranks of a group share a host
(NVLink / shared memory). The reservation is made, or refused with a `ClusterResourceError`,
when the `RayVirtualCluster` is built.
"""

from __future__ import annotations

import math
import uuid

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group


class ClusterResourceError(RuntimeError):
    """The Ray cluster cannot hold the requested workers."""


class RayVirtualCluster:
    """`num_nodes` x `workers_per_node` worker slots reserved on the current Ray cluster.

    Args:
        num_nodes: node groups (placement groups); each is packed onto one physical node.
        workers_per_node: bundles per node group, one worker each.
        use_gpus: one GPU per bundle (plus `cpus_per_worker` CPUs) instead of CPUs only.
        cpus_per_worker: CPUs per bundle; CPU workers also use this many threads.
        name: prefix of the placement-group names, "<name>-<random>-node<i>" (Ray requires
            live placement-group names to be unique, hence the random part).
        placement_timeout_s: how long to wait for resources that exist but are held by
            someone else. A request larger than the cluster's nodes fails at once.

    Raises:
        ClusterResourceError: the request does not fit on the cluster's nodes, or the
            resources were not free within `placement_timeout_s`.
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
        if not _fits(self.bundle, workers_per_node, num_nodes, _alive_node_totals()):
            raise ClusterResourceError(
                f"{self._request_text()}; that does not fit on this Ray cluster. "
                f"{_describe_nodes()} Ask for fewer workers or CPUs per worker, or give Ray "
                "more (init_ray(num_cpus=...), `ray start --num-cpus/--num-gpus`)."
            )
        pg_prefix = f"{name}-{uuid.uuid4().hex[:8]}"
        self._pgs: list[PlacementGroup] = [
            placement_group(
                [dict(self.bundle)] * workers_per_node,
                strategy="STRICT_PACK",
                name=f"{pg_prefix}-node{i}",
            )
            for i in range(num_nodes)
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
                f"{_describe_nodes()}"
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


def _alive_node_totals() -> list[dict[str, float]]:
    return [n["Resources"] for n in ray.nodes() if n["Alive"]]


def _fits(
    bundle: dict[str, float], per_group: int, num_groups: int, nodes: list[dict[str, float]]
) -> bool:
    """Whether `num_groups` groups of `per_group` bundles fit, each group on one node."""
    groups_per_node = [
        min(math.floor(total.get(res, 0) / (amount * per_group)) for res, amount in bundle.items())
        for total in nodes
    ]
    return sum(groups_per_node) >= num_groups


def _format_resources(resources: dict[str, float], keys=("CPU", "GPU")) -> str:
    return ", ".join(f"{k} {resources.get(k, 0):g}" for k in keys)


def _describe_nodes() -> str:
    nodes = [n for n in ray.nodes() if n["Alive"]]
    lines = [
        f"{n['NodeManagerAddress']} ({n['NodeManagerHostname']}): "
        + _format_resources(n["Resources"])
        for n in nodes
    ]
    return f"The cluster has {len(nodes)} node(s): " + "; ".join(lines) + "."
