"""The chunked loss on vocabulary-sharded logits (tensor parallelism, 2 gloo ranks) equals the
plain loss of one process on whole logits: value, and the gradients of the hidden states and of
the output layer. The hidden states come replicated, or sequence-sharded as under sequence
parallelism; the output layer is column-parallel with its logits left Shard(-1)."""

from __future__ import annotations

import copy

import pytest
import torch
from tests.unit.algorithms.test_chunked_loss import _case
from tests.unit.distributed_helpers import run_ranks
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, loss_parallel, parallelize_module

from nemo_rl.algorithms.chunked_loss import chunked_nll_sum
from nemo_rl.algorithms.loss_functions import NLLLoss
from nemo_rl.data.targets import count_valid_tokens, target_mask


def _plain_and_chunked(rank: int, sequence_parallel: bool, chunk_tokens: int) -> dict:
    torch.manual_seed(0)
    batch, hidden, head = _case()
    global_tokens = count_valid_tokens(batch)
    whole_hidden = hidden.clone().requires_grad_()
    plain, _ = NLLLoss()(head(whole_hidden), batch, global_tokens)
    plain.backward()

    mesh = init_device_mesh("cpu", (2,))
    sharded_head = parallelize_module(
        copy.deepcopy(head),
        mesh,
        ColwiseParallel(
            input_layouts=Shard(1) if sequence_parallel else Replicate(),
            output_layouts=Shard(-1),
            use_local_output=False,
        ),
    )
    if sequence_parallel:
        # This rank's tokens (torch.chunk's split, DTensor's: 6 and 5 of the 11 here).
        leaf = hidden.chunk(2, dim=1)[rank].clone().requires_grad_()
        tp_hidden = DTensor.from_local(leaf, mesh, [Shard(1)], run_check=False, shape=hidden.shape, stride=hidden.stride())
        want_hidden_grad = whole_hidden.grad.chunk(2, dim=1)[rank]
    else:
        leaf = hidden.clone().requires_grad_()
        tp_hidden = DTensor.from_local(leaf, mesh, [Replicate()], run_check=False)
        want_hidden_grad = whole_hidden.grad
    with loss_parallel():
        nll_sum = chunked_nll_sum(tp_hidden, sharded_head, batch["input_ids"], target_mask(batch), chunk_tokens=chunk_tokens)
        chunked = nll_sum / global_tokens.float()
        chunked.backward()
    return {
        "plain": (plain.detach(), want_hidden_grad, head.weight.grad, head.bias.grad),
        "chunked": (
            chunked.detach(),
            leaf.grad,
            sharded_head.weight.grad.full_tensor(),
            sharded_head.bias.grad.full_tensor(),
        ),
        "chunked_is_plain_tensor": not isinstance(chunked, DTensor),
    }


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["replicated", "sequence_sharded"])
def test_chunked_loss_on_vocabulary_sharded_logits_equals_the_plain_loss(sequence_parallel):
    for result in run_ranks(2, _plain_and_chunked, sequence_parallel, 4):
        assert result["chunked_is_plain_tensor"]
        for got, want in zip(result["chunked"], result["plain"]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
