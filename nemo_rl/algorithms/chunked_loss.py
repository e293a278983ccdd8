"""Masked next-token NLL from hidden states, without full-vocabulary logits for the batch.

Shape legend: B batch, T time, H hidden, V vocabulary, N target tokens, C tokens per chunk.

The plain loss materialises logits_BTV and an fp32 copy of them: for Llama-3.2-1B
(V = 128256) that is 0.5 MB per token per copy, several GB for a micro-batch of a few thousand
tokens. Here:
  1. only the positions that predict a target are kept (hidden_NH: SFT masks the prompt, so
     N is often a small fraction of B x T);
  2. the output layer and the fp32 cross-entropy run over C of them at a time, each chunk
     under activation checkpointing, so backward recomputes one chunk's logits at a time
     instead of keeping all of them (when all N fit in one chunk, its logits are kept:
     nothing would be saved by recomputing them).
Peak extra memory is one chunk's logits (C x V) instead of B x T x V. The per-token
arithmetic is the plain loss's (same output layer, same fp32 cross-entropy), so the sum
equals it up to summation order.

Under tensor parallelism the output layer is column-parallel and its logits are
vocabulary-sharded DTensors (Shard(-1)); the worker passes the hidden states as a DTensor on the
tensor-parallel mesh (replicated, or sequence-sharded with sequence parallelism). The chunks
then stay along the tokens: each chunk's hidden states are whole on every rank of the group,
its logits C x V/tp per rank (never gathered), and the cross-entropy, run under `loss_parallel`
by the worker, exchanges only per-token maxima and sums.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Replicate
from torch.utils.checkpoint import checkpoint

# fp32 logits elements per chunk (128 MiB): C = max(1, this // V).
CHUNK_LOGIT_ELEMENTS = 2**25


def _chunk_nll_sum(output_layer: nn.Module, hidden_CH: torch.Tensor, targets_C: torch.Tensor, weights_C: torch.Tensor) -> torch.Tensor:
    logits_CV = output_layer(hidden_CH).to(torch.float32)
    nll_C = F.cross_entropy(logits_CV, targets_C, reduction="none")
    if isinstance(nll_C, DTensor):
        # Vocabulary-sharded logits under `loss_parallel`: each token's NLL is already reduced
        # over the shards, the same on every rank.
        nll_C = nll_C.full_tensor()
    return (nll_C * weights_C).sum()


def _whole(value: torch.Tensor) -> torch.Tensor:
    return value.full_tensor() if isinstance(value, DTensor) else value


def chunked_nll_sum(
    hidden_BTH: torch.Tensor,
    output_layer: nn.Module,
    input_ids_BT: torch.Tensor,
    mask_BT1: torch.Tensor,
    *,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """sum over t of mask[b, t] * NLL(input_ids[b, t + 1] | hidden[b, t]), a 0-dim fp32 tensor.

    `mask_BT1` (B, T-1) weights the prediction made at position t (of token t + 1).
    `hidden_BTH` may be a DTensor on the tensor-parallel mesh (see the module docstring).
    """
    tp_mesh = hidden_BTH.device_mesh if isinstance(hidden_BTH, DTensor) else None
    if tp_mesh is not None:
        # Whole on every rank (gathered along the sequence under sequence parallelism): the
        # chunks select tokens, and each rank's output-layer shard needs every chunk's tokens.
        hidden_BTH = hidden_BTH.redistribute(placements=[Replicate()]).to_local()
    keep_BT1 = mask_BT1 != 0
    hidden_NH = hidden_BTH[:, :-1][keep_BT1]
    targets_N = input_ids_BT[:, 1:][keep_BT1]
    weights_N = mask_BT1[keep_BT1].to(torch.float32)
    if hidden_NH.shape[0] == 0:
        # No target here (an all-masked or filler micro-batch): a zero that still reaches
        # every layer, the output layer included, so every parameter gets a gradient and
        # FSDP's gradient reduction matches the other ranks' (an untied head left without
        # one would make this rank reduce-scatter less and hang or corrupt the step).
        first_B1H = hidden_BTH[:, :1] if tp_mesh is None else DTensor.from_local(hidden_BTH[:, :1], tp_mesh, [Replicate()])
        return (hidden_BTH.sum() + _whole(output_layer(first_B1H).sum())).to(torch.float32) * 0.0
    if chunk_tokens is None:
        vocab = getattr(output_layer, "out_features", None) or output_layer.weight.shape[0]
        chunk_tokens = max(1, CHUNK_LOGIT_ELEMENTS // vocab)
    # One chunk holds every target: its logits are the most backward will hold either way, so
    # they are kept rather than recomputed (which would cost the output layer's forward again).
    recompute = hidden_NH.shape[0] > chunk_tokens
    total = torch.zeros((), dtype=torch.float32, device=hidden_BTH.device)
    for start in range(0, hidden_NH.shape[0], chunk_tokens):
        chunk = slice(start, start + chunk_tokens)
        hidden_CH = hidden_NH[chunk]
        if tp_mesh is not None:
            hidden_CH = DTensor.from_local(hidden_CH, tp_mesh, [Replicate()], run_check=False)
        arguments = (output_layer, hidden_CH, targets_N[chunk], weights_N[chunk])
        if recompute:
            total = total + checkpoint(_chunk_nll_sum, *arguments, use_reentrant=False)
        else:
            total = total + _chunk_nll_sum(*arguments)
    return total
