"""Token-level negative log-likelihood, normalised by the global count of valid target tokens.

Shape legend: B batch, T time (tokens), V vocabulary.

Normalisation rule (NeMo RL's): every micro-batch on every data-parallel rank divides its
*sum* of token NLLs by the same number, the count of valid target tokens in the whole
global batch. Summing the micro-batch losses over micro-batches and ranks therefore gives
the mean NLL over the global batch, and the summed gradients are the gradient of that mean,
whatever the data-parallel size or micro-batch size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from nemo_rl.algorithms.chunked_loss import chunked_nll_sum
from nemo_rl.data.batched_data_dict import BatchedDataDict
from nemo_rl.data.targets import target_mask
from nemo_rl.models.policy.interfaces import LossFn, LossResult


class NLLLoss(LossFn):
    """loss = sum of masked token NLL in this micro-batch / global_valid_tokens."""

    computes_from_hidden_states = True

    def __call__(
        self,
        logits_BTV: torch.Tensor,
        batch: BatchedDataDict,
        global_valid_tokens: torch.Tensor,
    ) -> LossResult:
        mask_BT1 = target_mask(batch).to(logits_BTV.device)
        targets_BT1 = batch["input_ids"][:, 1:].to(logits_BTV.device)
        # Position t predicts token t+1; the last position predicts nothing.
        logits_BT1V = logits_BTV[:, :-1].to(torch.float32)
        nll_BT1 = F.cross_entropy(
            logits_BT1V.reshape(-1, logits_BT1V.shape[-1]),
            targets_BT1.reshape(-1),
            reduction="none",
        )
        if isinstance(nll_BT1, DTensor):
            # Vocabulary-parallel logits (tensor parallelism, under `loss_parallel`): each
            # token's NLL is already reduced over the vocabulary shards, the same on every rank.
            nll_BT1 = nll_BT1.full_tensor()
        nll_BT1 = nll_BT1.view_as(mask_BT1)
        nll_sum = (nll_BT1 * mask_BT1).sum()
        # An all-masked global batch has no tokens: its loss is 0, not NaN.
        loss = nll_sum / global_valid_tokens.to(nll_sum).clamp(min=1.0)
        metrics = {"nll_sum": nll_sum.detach(), "num_valid_tokens": mask_BT1.sum().detach()}
        return loss, metrics

    def from_hidden_states(
        self,
        hidden_BTH: torch.Tensor,
        output_layer: torch.nn.Module,
        batch: BatchedDataDict,
        global_valid_tokens: torch.Tensor,
    ) -> LossResult:
        """The same loss from the last hidden states and the output layer, in chunks:
        no full-vocabulary logits for the micro-batch (see `chunked_loss`)."""
        mask_BT1 = target_mask(batch).to(hidden_BTH.device)
        input_ids_BT = batch["input_ids"].to(hidden_BTH.device)
        nll_sum = chunked_nll_sum(hidden_BTH, output_layer, input_ids_BT, mask_BT1)
        loss = nll_sum / global_valid_tokens.to(nll_sum).clamp(min=1.0)
        metrics = {"nll_sum": nll_sum.detach(), "num_valid_tokens": mask_BT1.sum().detach()}
        return loss, metrics
