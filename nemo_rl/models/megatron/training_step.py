"""One pass of micro-batches through Megatron's pipeline schedule, with the algorithm's loss.

Shape legend: B batch, T time (tokens), V vocabulary (V_tp: this tensor-parallel rank's slice).

`run_micro_batches` hands Megatron's `get_forward_backward_func` a forward step that runs the
model on one micro-batch and, on the last pipeline stage, the algorithm's `LossFn` on its
logits. The schedule is told that every micro-batch counts one token and that the loss is
already per-token (`calculate_per_token_loss`), so it neither divides the loss by the number of
micro-batches nor by a token count: the `LossFn` has divided by the global count of valid
tokens, which is exactly the DTensor backend's normalisation. Gradients are then summed (not
averaged) over the data-parallel ranks, see `finalize_grads_without_token_scaling`.

Attention gets an explicit boolean mask (True: masked out): causal, and block-diagonal over
the samples of a packed row (whose `position_ids` restart at 0). RoPE in Megatron's GPTModel
rotates by the position in the row rather than by `position_ids`; within one sample that only
shifts every position by the same offset, which leaves the attention scores unchanged (RoPE is
relative), so packed samples stay independent of each other.

Under tensor parallelism the loss never sees the whole vocabulary on one rank: each rank's slice
of the logits becomes a vocabulary-sharded `DTensor` over the tensor-parallel group, and the
schedule runs under `loss_parallel`, so the `LossFn`'s cross-entropy exchanges per-token maxima,
sums and target logits instead of the logits. That is how the DTensor backend hands its TP
logits to the same `LossFn`, so one loss serves both backends (megatron-core's own
`vocab_parallel_cross_entropy` would need a Megatron-only loss interface). Columns past the
model's vocabulary (Megatron pads the output layer to a multiple of the TP size) are set to
-inf: they carry no probability and receive no gradient, as when they are cut off at TP 1.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core import parallel_state as mpu
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.parallel import loss_parallel

from nemo_rl.data.batched_data_dict import BatchedDataDict
from nemo_rl.models.policy.interfaces import LossFn


def attention_mask(mb: BatchedDataDict) -> torch.Tensor:
    """mask_B1TT, True where a query must not see a key: the future, and other packed samples."""
    input_ids_BT = mb["input_ids"]
    B, T = input_ids_BT.shape
    future_TT = torch.triu(torch.ones(T, T, dtype=torch.bool, device=input_ids_BT.device), diagonal=1)
    if "position_ids" not in mb:
        return future_TT.expand(B, 1, T, T)
    # A new sample starts where the position restarts at 0; sample_BT numbers them per row.
    starts_BT = mb["position_ids"].to(input_ids_BT.device) == 0
    sample_BT = torch.cumsum(starts_BT.long(), dim=1)
    other_sample_BTT = sample_BT[:, :, None] != sample_BT[:, None, :]
    return (future_TT[None] | other_sample_BTT)[:, None]


def position_ids(mb: BatchedDataDict) -> torch.Tensor:
    if "position_ids" in mb:
        return mb["position_ids"]
    B, T = mb["input_ids"].shape
    return torch.arange(T, device=mb["input_ids"].device).expand(B, T)


def finalize_grads_without_token_scaling(model_chunks: list, num_tokens: Any = None, **kwargs: Any) -> None:
    """Megatron's gradient finalisation (data-parallel reduction, tied-embedding and layer-norm
    all-reduces) without its division by the token count: the loss already carries it."""
    finalize_model_grads(model_chunks, num_tokens=None, **kwargs)


class VocabularyLogits:
    """This rank's output-layer slice of the logits as what the `LossFn` reads: the model's
    vocabulary, whole at TP 1, vocabulary-sharded (`DTensor`, never gathered) above.
    Built once per worker, after the model-parallel groups exist."""

    def __init__(self, vocab_size: int, device: torch.device):
        self.vocab_size = vocab_size
        tp_group = mpu.get_tensor_model_parallel_group()
        self.tp_size = torch.distributed.get_world_size(tp_group)
        self.tp_rank = torch.distributed.get_rank(tp_group)
        self.tp_mesh = DeviceMesh.from_group(tp_group, device.type) if self.tp_size > 1 else None

    def __call__(self, logits_BTV_tp: torch.Tensor) -> torch.Tensor:
        if self.tp_mesh is None:
            return logits_BTV_tp[..., : self.vocab_size]
        V_tp = logits_BTV_tp.shape[-1]
        real_columns = self.vocab_size - self.tp_rank * V_tp  # of this slice; fewer on the last ranks
        if real_columns < V_tp:
            is_padding_V = torch.arange(V_tp, device=logits_BTV_tp.device) >= real_columns
            logits_BTV_tp = logits_BTV_tp.masked_fill(is_padding_V, float("-inf"))
        return DTensor.from_local(logits_BTV_tp, self.tp_mesh, [Shard(2)], run_check=False)

    def loss_context(self) -> contextlib.AbstractContextManager:
        """Cross-entropy over the vocabulary shards, for the forward and the backward pass."""
        return loss_parallel() if self.tp_mesh is not None else contextlib.nullcontext()


def _loss_on_last_stage(
    loss_fn: LossFn,
    mb: BatchedDataDict,
    global_valid_tokens: torch.Tensor,
    vocabulary: VocabularyLogits,
    logits_BTV_tp: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    loss, metrics = loss_fn(vocabulary(logits_BTV_tp), mb, global_valid_tokens)
    reported = {"loss": loss.detach().to(torch.float64), "num_valid_tokens": metrics["num_valid_tokens"].detach().double()}
    # One "token" per micro-batch: the schedule's own per-token scaling becomes a no-op.
    return loss, torch.ones((), dtype=torch.int), reported


def run_micro_batches(
    model_chunks: list[torch.nn.Module],
    micro_batches: list[BatchedDataDict],
    loss_fn: LossFn,
    global_valid_tokens: torch.Tensor,
    *,
    vocabulary: VocabularyLogits,
    device: torch.device,
    forward_only: bool,
) -> list[dict[str, torch.Tensor]]:
    """Forward (and, unless `forward_only`, backward) of every micro-batch through the
    pipeline, `loss_fn` seeing the logits of the model's vocabulary (padding cut off or masked,
    `vocabulary`); the per-micro-batch {"loss", "num_valid_tokens"} on the last pipeline stage,
    [] on the others."""
    batches = iter([mb.to(device) for mb in micro_batches])

    def forward_step(data_iterator: Any, model: torch.nn.Module) -> tuple[torch.Tensor, Callable]:
        mb = next(data_iterator)
        output = model(mb["input_ids"], position_ids(mb), attention_mask(mb))
        return output, partial(_loss_on_last_stage, loss_fn, mb, global_valid_tokens, vocabulary)

    first = micro_batches[0]["input_ids"]
    forward_backward = get_forward_backward_func()
    with vocabulary.loss_context():
        return forward_backward(
            forward_step_func=forward_step,
            data_iterator=batches,
            model=model_chunks,
            num_microbatches=len(micro_batches),
            # Pipeline stages exchange activations of each micro-batch's own shape
            # (`variable_seq_lengths` in the transformer config); these are the first one's.
            seq_length=first.shape[1],
            micro_batch_size=first.shape[0],
            forward_only=forward_only,
        )


def ensure_optimizer_states(optimizer: Any) -> None:
    """Gives every parameter its Adam states (zeros) if it has none yet, as before the first step.

    A checkpoint taken before the first step must still describe every shard, and a load needs a
    template of the same form. Each parameter gets its own `step` tensor: torch's Adam advances
    each one in place, so a tensor shared between parameters would advance once per parameter.
    """
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_optimizer = getattr(inner, "optimizer", None)
        if torch_optimizer is None or getattr(inner, "init_state_fn", None) is None:
            continue
        fresh = [p for group in torch_optimizer.param_groups for p in group["params"] if not torch_optimizer.state[p]]
        inner.init_state_fn(torch_optimizer, inner.config)
        for p in fresh:
            state = torch_optimizer.state[p]
            if state and "step" not in state and isinstance(torch_optimizer, torch.optim.Adam | torch.optim.AdamW):
                state["step"] = torch.zeros((), dtype=torch.float32)
