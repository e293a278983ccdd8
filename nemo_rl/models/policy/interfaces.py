"""What a policy worker calls and the algorithm provides: the loss function.

The algorithm owns its loss (SFT's masked NLL, later DPO's preference loss) and hands it to
`Policy.train(batch, loss_fn)`; the workers call it once per micro-batch and never build one
themselves, so the models layer does not depend on any algorithm.

Shape legend: B batch, T time (tokens), H hidden, V vocabulary.

The normalisation contract: every micro-batch on every data-parallel rank divides what it sums
by `global_valid_tokens`, the count of target tokens in the whole global batch (all-reduced by
the workers before the first micro-batch). Summing the micro-batch losses over micro-batches and
ranks therefore gives the loss of the global batch whatever the data-parallel size, the
micro-batch size or packing. With `global_valid_tokens = 1` a loss returns its plain sum, which
is how validation adds losses up over micro-batches, ranks and batches before one division.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from nemo_rl.data.batched_data_dict import BatchedDataDict

LossResult = tuple[torch.Tensor, dict[str, Any]]


class LossFn(Protocol):
    """A loss over one micro-batch; picklable (it travels to the Ray workers).

    Returns (loss, metrics): `loss` a 0-dim tensor to backpropagate, `metrics` detached tensors
    that must include `num_valid_tokens`, the target tokens this micro-batch counted.

    A loss that sets `computes_from_hidden_states = True` also implements `from_hidden_states`,
    the same loss from the last hidden states and the output layer. The worker then never
    materialises the full-vocabulary logits of a micro-batch (where it has verified that the
    output layer alone maps the hidden states to the model's logits). Subclass this protocol to
    inherit the default: logits only.
    """

    computes_from_hidden_states: ClassVar[bool] = False

    def __call__(
        self, logits_BTV: torch.Tensor, mb: BatchedDataDict, global_valid_tokens: torch.Tensor
    ) -> LossResult: ...

    def from_hidden_states(
        self,
        hidden_BTH: torch.Tensor,
        output_layer: nn.Module,
        mb: BatchedDataDict,
        global_valid_tokens: torch.Tensor,
    ) -> LossResult:
        raise NotImplementedError(f"{type(self).__name__} computes its loss from logits only")
