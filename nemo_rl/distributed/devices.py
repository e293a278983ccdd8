"""Which device the workers train on: `cluster.device`, with `auto` resolved where the job runs.

Resolution happens here, on the node that starts the job, not when the config is validated:
validating a config on a login node without GPUs must give the same answer as on the job's node.
"""

from __future__ import annotations

from typing import Literal

Device = Literal["cuda", "cpu"]


def resolve_device(requested: Literal["auto", "cuda", "cpu"]) -> Device:
    """`auto` becomes cuda when this node has a GPU, cpu otherwise; the others stay as given."""
    if requested != "auto":
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
