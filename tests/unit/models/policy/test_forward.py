"""Packed rows on a real tiny Llama (SDPA, fp32): no sample attends to another, and the
worker's two start-up checks tell models that qualify from models that do not."""

from __future__ import annotations

import pytest
import torch
from tests.unit.models.policy.policy_test_utils import VOCAB, tiny_llama
from transformers import Gemma2Config, Gemma2ForCausalLM

from nemo_rl.data.batched_data_dict import BatchedDataDict
from nemo_rl.models.policy.forward import (
    forward_hidden_states,
    forward_logits,
    output_layer_gives_logits,
    packed_attention_is_isolated,
)

@pytest.fixture(scope="module")
def llama():
    return tiny_llama().eval()


def _samples(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g) for n in (29, 2, 11, 1, 6)]


def _packed(samples: list[torch.Tensor], *, pad: int = 3) -> BatchedDataDict:
    input_ids = torch.cat([*samples, torch.zeros(pad, dtype=torch.int64)])
    positions = torch.cat([torch.arange(len(s)) for s in samples] + [torch.arange(pad)])
    return BatchedDataDict(input_ids=input_ids[None], position_ids=positions[None])


def _spans(samples):
    starts = torch.tensor([0] + [len(s) for s in samples]).cumsum(0).tolist()
    return [slice(a, b) for a, b in zip(starts, starts[1:])]


@torch.no_grad()
def test_each_packed_sample_gets_the_logits_it_gets_alone(llama):
    samples = _samples(0)
    packed_TV = forward_logits(llama, _packed(samples))[0]
    for sample, span in zip(samples, _spans(samples)):
        alone_TV = forward_logits(llama, BatchedDataDict(input_ids=sample[None]))[0]
        torch.testing.assert_close(packed_TV[span], alone_TV, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_changing_one_packed_sample_does_not_change_the_others(llama):
    samples = _samples(1)
    before_TV = forward_logits(llama, _packed(samples))[0]
    changed = list(samples)
    changed[0] = (samples[0] + 5) % (VOCAB - 1) + 1  # the long sample in front of all others
    changed[2] = torch.flip(samples[2], dims=[0])
    after_TV = forward_logits(llama, _packed(changed))[0]
    spans = _spans(samples)
    for k in (1, 3, 4):
        torch.testing.assert_close(after_TV[spans[k]], before_TV[spans[k]], rtol=0, atol=1e-6)
    assert not torch.allclose(after_TV[spans[0]], before_TV[spans[0]])

    # The same row without restarting positions is one long sequence: the change leaks.
    plain = lambda s: BatchedDataDict(input_ids=_packed(s)["input_ids"])  # noqa: E731
    leaked_TV = forward_logits(llama, plain(changed))[0] - forward_logits(llama, plain(samples))[0]
    assert leaked_TV[spans[4]].abs().max() > 1e-3


@torch.no_grad()
def test_hidden_states_through_the_output_layer_are_the_logits(llama):
    mb = _packed(_samples(2))
    torch.testing.assert_close(llama.lm_head(forward_hidden_states(llama, mb)), forward_logits(llama, mb), rtol=0, atol=0)


def test_startup_checks_pass_for_llama(llama):
    assert packed_attention_is_isolated(llama)
    assert output_layer_gives_logits(llama)
    assert not llama.training  # left as found


class _IgnoresPositionIds(torch.nn.Module):
    """A model whose attention cannot see packing (like remote code that drops position_ids)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def forward(self, input_ids, position_ids=None, **kwargs):
        return self.model(input_ids=input_ids, **kwargs)


def test_packing_check_fails_for_a_model_that_ignores_position_ids(llama):
    assert not packed_attention_is_isolated(_IgnoresPositionIds(llama))


def test_chunked_loss_check_fails_for_soft_capped_logits():
    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, final_logit_softcapping=2.0,
    )
    gemma = Gemma2ForCausalLM(config)
    assert not output_layer_gives_logits(gemma)
    config.final_logit_softcapping = None
    assert output_layer_gives_logits(Gemma2ForCausalLM(config))
