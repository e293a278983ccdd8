"""Ray orchestration: the cluster, the slots reserved on it, and the workers in them."""

from nemo_rl.distributed.devices import resolve_device
from nemo_rl.distributed.ray_cluster import init_ray, shutdown_ray
from nemo_rl.distributed.virtual_cluster import ClusterResourceError, RayVirtualCluster
from nemo_rl.distributed.worker_env import init_torch_distributed
from nemo_rl.distributed.worker_group import (
    RayWorkerGroup,
    WorkerDiedError,
    WorkerError,
    WorkerFutures,
    WorkerInfo,
)

__all__ = [
    "ClusterResourceError",
    "RayVirtualCluster",
    "RayWorkerGroup",
    "WorkerDiedError",
    "WorkerError",
    "WorkerFutures",
    "WorkerInfo",
    "init_ray",
    "init_torch_distributed",
    "resolve_device",
    "shutdown_ray",
]
