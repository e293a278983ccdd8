"""The model calls a policy worker makes, and two checks that what they rely on holds.

Shape legend: B batch, T time (tokens), H hidden, V vocabulary.

Packed rows carry `position_ids` that restart at 0 for every sample. Hugging Face models
(transformers >= 5, through `masking_utils.create_causal_mask`) turn restarting positions
into per-sample attention: an exact block-diagonal causal mask for the SDPA and eager
kernels, variable-length boundaries for flash-attention. `packed_attention_is_isolated`
checks, once per worker on the loaded model (before compiling and sharding), that it does.

The chunked loss needs the last hidden states and an output layer whose output is the
logits; `output_layer_gives_logits` checks that (models that soft-cap or scale their
logits after the output layer fail it, and train with the plain loss).
"""

from __future__ import annotations

import torch
from torch import nn

from nemo_rl.data.batched_data_dict import BatchedDataDict


def _inputs(mb: BatchedDataDict) -> dict[str, torch.Tensor | bool]:
    inputs: dict[str, torch.Tensor | bool] = {"input_ids": mb["input_ids"], "use_cache": False}
    if "position_ids" in mb:
        inputs["position_ids"] = mb["position_ids"]
    return inputs


def forward_logits(model: nn.Module, mb: BatchedDataDict, **model_kwargs) -> torch.Tensor:
    """logits_BTV. Padding is on the right, so the causal mask alone keeps valid tokens from
    seeing it: no attention mask, and default position ids unless the rows are packed.
    `model_kwargs` go to the model as they are (e.g. a context-parallel layout)."""
    return model(**_inputs(mb), **model_kwargs).logits


def forward_hidden_states(model: nn.Module, mb: BatchedDataDict, **model_kwargs) -> torch.Tensor:
    """hidden_BTH: the last hidden states (after the final norm), what the output layer
    takes. Only those are returned (`output_hidden_states=-1`; older models return all, of
    which this is the last), and logits for the last position only (`logits_to_keep=1`)."""
    out = model(**_inputs(mb), output_hidden_states=-1, logits_to_keep=1, **model_kwargs)
    return out.hidden_states[-1]


def _probe_ids(model: nn.Module, length: int, offset: int) -> torch.Tensor:
    vocab = model.config.get_text_config().vocab_size
    device = next(model.parameters()).device
    return ((torch.arange(length, device=device) * 7 + offset) % (vocab - 1) + 1)[None]


@torch.no_grad()
def output_layer_gives_logits(model: nn.Module) -> bool:
    """True when output_layer(forward_hidden_states(...)) reproduces the model's logits."""
    was_training = model.training
    model.eval()
    try:
        mb = BatchedDataDict(input_ids=_probe_ids(model, 8, 3))
        want_BTV = forward_logits(model, mb).float()
        got_BTV = model.get_output_embeddings()(forward_hidden_states(model, mb)).float()
    except (TypeError, ValueError, AttributeError, IndexError):  # no logits_to_keep, no hidden states
        return False
    finally:
        model.train(was_training)
    scale = want_BTV.abs().max().clamp(min=1e-6)
    return want_BTV.shape == got_BTV.shape and bool(((want_BTV - got_BTV).abs().max() / scale) < 1e-5)


@torch.no_grad()
def packed_attention_is_isolated(model: nn.Module) -> bool:
    """True when a sample's logits in a packed row equal its logits alone."""
    was_training = model.training
    model.eval()
    try:
        first, second = _probe_ids(model, 12, 5), _probe_ids(model, 5, 11)
        packed = BatchedDataDict(
            input_ids=torch.cat([first, second], dim=1),
            position_ids=torch.cat([torch.arange(12), torch.arange(5)]).to(first.device)[None],
        )
        got_TV = forward_logits(model, packed)[0, 12:]
        want_TV = forward_logits(model, BatchedDataDict(input_ids=second))[0]
    finally:
        model.train(was_training)
    # Loose enough for bf16 rounding; attention to 12 extra tokens changes logits far more.
    tolerance = 1e-4 if got_TV.dtype == torch.float32 else 1e-2
    got_TV, want_TV = got_TV.float(), want_TV.float()
    scale = want_TV.abs().max().clamp(min=1e-6)
    return bool(((got_TV - want_TV).abs().max() / scale) < tolerance)
