"""Tensor-parallel styles for plan entries that torch's `ColwiseParallel`/`RowwiseParallel` do
not cover.

Shape legend: B batch, T time, h this rank's attention heads, D head dim.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle


class PerHeadReplicated(ParallelStyle):
    """A module applied to each attention head on its own (Qwen3 and Gemma 3's `q_norm` and
    `k_norm`, an RMSNorm over the head dim), transformers' "replicated_with_grad_allreduce".

    Its weights are whole on every rank of the tensor-parallel group (Replicate). Its input,
    states_BThD, holds this rank's own heads (the column-parallel q/k projections split the
    heads), so it is taken as the heads-sharded slice of the whole tensor (Shard on the heads
    dim): the forward is unchanged, and the weights' gradient, a sum over every head, becomes
    a partial sum per rank that DTensor reduces over the group. Without that reduction each
    rank would update the weights from its own heads only, and the replicas would drift apart.
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(module, device_mesh, _replicate_parameters, _heads_sharded_input, _local_output)


def _replicate_parameters(name: str, module: nn.Module, mesh: DeviceMesh) -> None:
    for param_name, param in list(module.named_parameters(recurse=False)):
        replicated = nn.Parameter(distribute_tensor(param, mesh, [Replicate()]), requires_grad=param.requires_grad)
        module.register_parameter(param_name, replicated)


def _heads_sharded_input(module: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
    states_BThD = inputs[0]
    if isinstance(states_BThD, DTensor):
        return inputs
    heads_dim = states_BThD.dim() - 2
    return (DTensor.from_local(states_BThD, mesh, [Shard(heads_dim)], run_check=False), *inputs[1:])


def _local_output(module: nn.Module, output: DTensor, mesh: DeviceMesh) -> torch.Tensor:
    return output.to_local()
