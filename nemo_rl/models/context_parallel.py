"""Context parallelism: each rank of a cp group runs attention for a slice of every row's tokens.

Shape legend: B batch, T time (tokens of the whole row), L local tokens (T / cp), H heads,
D head dim, V vocabulary.

The approach is the all-gather of keys and values (as Llama 3's long-context training does), not
ring attention: each rank keeps the queries of its tokens, all-gathers the keys and values of the
whole row over the cp group (an autograd-aware all-gather whose backward reduce-scatters the
gradients back to their owners) and runs one SDPA with a mask built from *global* token indices:
causal, and, for packed rows, same-sample. That mask is explicit, so packing and any other mask
work unchanged, on gloo as on NCCL; the price is the whole row's K/V on every rank, once per layer.

Load balance: the row (padded to a multiple of 2 x cp) is cut into 2 x cp chunks and rank i takes
chunks i and 2cp-1-i, so every rank gets the same amount of causal attention work.

Everything else in a decoder layer works per token, so it runs on the local tokens as is; the
positions given to the model stay global (rotary embeddings). The loss needs the *next* token of
each local token, which may live on another rank: `shard_micro_batch` hands the loss a batch of
those next tokens instead (`LocalMicroBatch.loss_batch`).

The attention runs inside Hugging Face's model through transformers' `AttentionInterface`
(registered under `ATTENTION_NAME`); the worker passes each forward its `ContextParallelLayout`
as the model keyword `cp_layout`, which HF models hand down to their attention function.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from nemo_rl.data.batched_data_dict import BatchedDataDict

ATTENTION_NAME = "nemo_rl_context_parallel_sdpa"
LAYOUT_KWARG = "cp_layout"


class ContextParallelLayout:
    """Which tokens of the row this rank holds, for one micro-batch.

    `query_index_L`: the global index of each local token. `key_index_T`: the global index of each
    gathered key, in the order the all-gather lays them out (rank 0's tokens, then rank 1's ...).
    `sample_BT`: per global token, the packed sample it belongs to (None: one sample per row).

    A plain class, not a dataclass: FSDP rebuilds dataclass arguments field by field on every
    layer, which would leave each layer a copy (and its own mask cache and call count).
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None,
        query_index_L: torch.Tensor,
        key_index_T: torch.Tensor,
        sample_BT: torch.Tensor | None = None,
    ):
        self.group = group
        self.query_index_L, self.key_index_T, self.sample_BT = query_index_L, key_index_T, sample_BT
        self.attention_calls = 0
        self._masks: dict[int | None, torch.Tensor] = {}

    def to(self, device: torch.device) -> ContextParallelLayout:
        return ContextParallelLayout(
            self.group,
            self.query_index_L.to(device),
            self.key_index_T.to(device),
            None if self.sample_BT is None else self.sample_BT.to(device),
        )

    def mask(self, sliding_window: int | None = None) -> torch.Tensor:
        """allowed_B1LT (bool): query l may attend key t. Built once per forward and window."""
        if sliding_window not in self._masks:
            q_L1, k_1T = self.query_index_L[:, None], self.key_index_T[None, :]
            allowed_LT = k_1T <= q_L1
            if sliding_window is not None:
                allowed_LT = allowed_LT & (k_1T > q_L1 - sliding_window)
            allowed_BLT = allowed_LT[None]
            if self.sample_BT is not None:
                query_sample_BL = self.sample_BT[:, self.query_index_L]
                key_sample_BT = self.sample_BT[:, self.key_index_T]
                allowed_BLT = allowed_BLT & (query_sample_BL[:, :, None] == key_sample_BT[:, None, :])
            self._masks[sliding_window] = allowed_BLT[:, None]
        return self._masks[sliding_window]


def load_balanced_indices(length: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """The global token indices rank `cp_rank` holds: chunks cp_rank and 2cp-1-cp_rank of 2cp."""
    if length % (2 * cp_size):
        raise ValueError(f"context parallelism needs the row length ({length}) to be a multiple of 2 x cp = {2 * cp_size}")
    chunk = length // (2 * cp_size)
    first, second = cp_rank, 2 * cp_size - 1 - cp_rank
    return torch.cat([torch.arange(first * chunk, (first + 1) * chunk), torch.arange(second * chunk, (second + 1) * chunk)])


@dataclass
class LocalMicroBatch:
    """One rank's part of a micro-batch: `model_inputs` (input_ids_BL, global position_ids_BL)
    for the forward with `layout`; `loss_batch` for the loss function, laid out so that its
    position l + 1 holds the target of local token l (its `input_ids` and `token_mask` are the
    next tokens'; position 0 is a placeholder), which pairs with logits padded by one position
    (`pad_one_position`)."""

    model_inputs: BatchedDataDict
    loss_batch: BatchedDataDict
    layout: ContextParallelLayout


def shard_micro_batch(
    mb: BatchedDataDict, *, cp_size: int, cp_rank: int, group: dist.ProcessGroup | None, length_multiple: int = 1
) -> LocalMicroBatch:
    """This rank's tokens of every row of `mb` (right-padded; packed rows carry `position_ids`
    that restart at each sample). Rows are padded to a multiple of 2 x cp x `length_multiple`."""
    input_ids_BT = mb["input_ids"]
    B, T = input_ids_BT.shape
    multiple = 2 * cp_size * length_multiple
    padded = -(-T // multiple) * multiple
    pad = padded - T
    packed = "position_ids" in mb
    if packed:
        position_ids_BT = mb["position_ids"].expand(B, T)
        # Padding continues the last sample's positions: it is after every real token (causal).
        tail_BP = position_ids_BT[:, -1:] + torch.arange(1, pad + 1)[None]
        position_ids_BT = torch.cat([position_ids_BT, tail_BP], dim=1)
        # A new sample wherever the positions do not go up by one (Hugging Face's own rule).
        diff_BT = torch.diff(position_ids_BT, prepend=position_ids_BT[:, :1] - 1, dim=1)
        sample_BT = (diff_BT != 1).cumsum(dim=1)
    else:
        position_ids_BT = torch.arange(padded)[None].expand(B, padded)
        sample_BT = None
    input_ids_BT = F.pad(input_ids_BT, (0, pad))
    token_mask_BT = F.pad(mb["token_mask"].to(torch.float32), (0, pad))

    index_L = load_balanced_indices(padded, cp_size, cp_rank)
    key_index_T = torch.cat([load_balanced_indices(padded, cp_size, r) for r in range(cp_size)])
    # The target of token t is token t + 1 (none for the last).
    next_ids_BT = F.pad(input_ids_BT[:, 1:], (0, 1))
    next_mask_BT = F.pad(token_mask_BT[:, 1:], (0, 1))
    placeholder_B1 = torch.zeros((B, 1), dtype=input_ids_BT.dtype)
    loss_batch = BatchedDataDict(
        input_ids=torch.cat([placeholder_B1, next_ids_BT[:, index_L]], dim=1),
        token_mask=torch.cat([placeholder_B1.to(torch.float32), next_mask_BT[:, index_L]], dim=1),
        sample_mask=mb["sample_mask"],
    )
    model_inputs = BatchedDataDict(
        input_ids=input_ids_BT[:, index_L].contiguous(), position_ids=position_ids_BT[:, index_L].contiguous()
    )
    layout = ContextParallelLayout(group, index_L, key_index_T, sample_BT)
    return LocalMicroBatch(model_inputs, loss_batch, layout)


def pad_one_position(x_BLX: torch.Tensor) -> torch.Tensor:
    """x with one more (zero) position at the end of dim 1: logits or hidden states of the local
    tokens, aligned with `LocalMicroBatch.loss_batch` (the loss drops the last position)."""
    return torch.cat([x_BLX, x_BLX[:, -1:] * 0], dim=1)


class _GatherSequence(torch.autograd.Function):
    """x_BHLD of every cp rank, stacked: gathered_RBHLD (R = cp ranks). Backward reduce-scatters:
    each rank gets the sum over ranks of the gradients with respect to its own x."""

    @staticmethod
    def forward(ctx, x_BHLD: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        size = dist.get_world_size(group)
        x_BHLD = x_BHLD.contiguous()
        gathered = x_BHLD.new_empty((size * x_BHLD.shape[0], *x_BHLD.shape[1:]))
        dist.all_gather_into_tensor(gathered, x_BHLD, group=group)
        return gathered.view(size, *x_BHLD.shape)

    @staticmethod
    def backward(ctx, grad_RBHLD: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad_RBHLD = grad_RBHLD.contiguous()
        size = grad_RBHLD.shape[0]
        grad_BHLD = grad_RBHLD.new_empty(grad_RBHLD.shape[1:])
        dist.reduce_scatter_tensor(grad_BHLD, grad_RBHLD.view(size * grad_RBHLD.shape[1], *grad_RBHLD.shape[2:]), group=ctx.group)
        return grad_BHLD, None


def gather_sequence(x_BHLD: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """x_BHTD: the whole row's keys or values, in the layout's `key_index_T` order."""
    gathered_RBHLD = _GatherSequence.apply(x_BHLD, group)
    R, B, H, L, D = gathered_RBHLD.shape
    return gathered_RBHLD.permute(1, 2, 0, 3, 4).reshape(B, H, R * L, D)


def context_parallel_attention(
    module: nn.Module,
    query_BHLD: torch.Tensor,
    key_BHLD: torch.Tensor,
    value_BHLD: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature; returns (attn_output_BLHD, None).

    Without a layout (generation, `get_logits`: every rank of the group holds whole rows) it is
    plain causal SDPA over the local sequence, as transformers' own "sdpa".
    """
    layout: ContextParallelLayout | None = kwargs.get(LAYOUT_KWARG)
    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise ValueError(f"context parallelism: {type(module).__name__} uses attention {name}, which it does not implement")
    if attention_mask is not None:
        raise ValueError(
            f"context parallelism: {type(module).__name__} passes its own attention mask, which the context-parallel "
            "attention would ignore"
        )
    if layout is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query_BHLD, key_BHLD, value_BHLD, None, dropout=dropout, scaling=scaling)
    layout.attention_calls += 1
    key_BHTD = gather_sequence(key_BHLD, layout.group)
    value_BHTD = gather_sequence(value_BHLD, layout.group)
    repeats = query_BHLD.shape[1] // key_BHTD.shape[1]  # grouped-query attention
    if repeats > 1:
        key_BHTD = key_BHTD.repeat_interleave(repeats, dim=1)
        value_BHTD = value_BHTD.repeat_interleave(repeats, dim=1)
    mask_B1LT = layout.mask(kwargs.get("sliding_window"))
    out_BHLD = F.scaled_dot_product_attention(
        query_BHLD, key_BHTD, value_BHTD, attn_mask=mask_B1LT, dropout_p=dropout, scale=scaling
    )
    return out_BHLD.transpose(1, 2).contiguous(), None


def enable_context_parallel_attention(model: nn.Module) -> None:
    """Switches `model` to the context-parallel attention; ValueError naming the model when its
    attention cannot be switched (it does not go through transformers' AttentionInterface)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, context_parallel_attention)
    can_switch = getattr(model, "_can_set_attn_implementation", lambda: False)()
    if can_switch:
        model.set_attn_implementation(ATTENTION_NAME)
    if not can_switch or model.config._attn_implementation != ATTENTION_NAME:
        raise ValueError(
            f"policy.dtensor_cfg.context_parallel_size: {type(model).__name__}'s attention cannot be replaced "
            "through transformers' AttentionInterface, so it cannot be split over context-parallel ranks; set "
            "context_parallel_size to 1"
        )


def check_attention_was_hooked(layout: ContextParallelLayout, expected_calls: int, model_name: str) -> None:
    """After a forward: every attention layer went through the context-parallel attention (a layer
    that did not would have attended to this rank's tokens only)."""
    if layout.attention_calls != expected_calls:
        raise RuntimeError(
            f"policy.dtensor_cfg.context_parallel_size: {model_name} ran the context-parallel attention in "
            f"{layout.attention_calls} of its {expected_calls} layers (its layers do not pass the model's keyword "
            "arguments to their attention); set context_parallel_size to 1"
        )
