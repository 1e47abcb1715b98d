"""Behaviour cloning (BC / SFT): maximum likelihood of the data's tokens.

On teacher samples this is sequence-level KD (SeqKD, Kim & Rush 2016); on reference answers it is SFT.

    L(theta) = - E_{(s, a) ~ D} [ log pi_theta(a | s) ],   pi_theta = softmax over the full vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from algorithms.base import AlgoConfig, Algorithm, float_stats
from tokenrl.core.distributions import masked_mean, token_nll, upcast
from tokenrl.data.buffer import Batch


@dataclass
class BCConfig(AlgoConfig):
    """Behaviour cloning has no fields beyond the optimiser's."""


def bc_loss(logits_BTV: torch.Tensor, actions_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of ``actions_BT`` under ``softmax(logits_BTV)`` over valid steps.

    The dense form of :meth:`tokenrl.lm.policy.CausalLMPolicy.action_nll` (which :class:`BC` uses to keep memory
    flat at large vocabularies); KD's cross-entropy term reuses the dense logits it already has.
    """
    return masked_mean(token_nll(upcast(logits_BTV), actions_BT), mask_BT)


class BC(Algorithm):
    """Cross-entropy on the data's tokens."""

    name = "bc"

    def compute_loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        T = batch.actions_BT.shape[1]
        h_BTD = self.policy.state_hidden(batch)[:, :T]
        loss = masked_mean(self.policy.action_nll(h_BTD, batch.actions_BT), batch.action_mask_BT)
        return loss, float_stats({"loss/total": loss, "loss/ce": loss})
