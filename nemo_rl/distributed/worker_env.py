"""What a worker finds in its environment, and the torch.distributed setup built on it.

`RayWorkerGroup` sets these variables in each worker process before the worker class is
constructed (the same names torchrun uses, so a worker also runs under torchrun):

    RANK, WORLD_SIZE           global rank, number of ranks
    LOCAL_RANK, LOCAL_WORLD_SIZE   rank among, and number of, the ranks on this node
    NODE_RANK                  index of this node among the group's nodes
    MASTER_ADDR, MASTER_PORT   rank 0's node IP and a port that was free there
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

# GPU ranks also get gloo for CPU tensors: with cpu_offload the gradient norm is reduced on CPU.
_BACKEND_BY_DEVICE = {"cuda": "cpu:gloo,cuda:nccl", "cpu": "gloo"}


def init_torch_distributed(
    device: str | torch.device = "cpu", *, timeout: timedelta | None = None
) -> tuple[int, int, torch.device]:
    """Join this process to the default process group described by the environment.

    NCCL on "cuda", gloo on "cpu". Under Ray each worker sees only its own GPU, so its
    device is cuda:0; under torchrun (all GPUs visible) it is cuda:LOCAL_RANK. Calling it
    again in the same process returns the existing group's rank and size.

    Args:
        device: "cpu" or "cuda" (an index, if given, is replaced by the rule above).
        timeout: collective timeout; None keeps torch's default.

    Returns:
        (rank, world_size, the torch.device this rank computes on)
    """
    device_type = torch.device(device).type
    if device_type not in _BACKEND_BY_DEVICE:
        raise ValueError(f"device {device!r}: expected one of {sorted(_BACKEND_BY_DEVICE)}")
    missing = [
        v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ
    ]
    if missing and not dist.is_initialized():
        raise RuntimeError(
            f"{', '.join(missing)} not set: run this inside a RayWorkerGroup worker (or torchrun)"
        )

    if device_type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch_device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(torch_device)
    else:
        torch_device = torch.device("cpu")

    if not dist.is_initialized():
        dist.init_process_group(
            backend=_BACKEND_BY_DEVICE[device_type],
            init_method="env://",
            rank=int(os.environ["RANK"]),
            world_size=int(os.environ["WORLD_SIZE"]),
            timeout=timeout,
            # Binding NCCL to the device up front makes its communicator init eager.
            device_id=torch_device if device_type == "cuda" else None,
        )
    return dist.get_rank(), dist.get_world_size(), torch_device
