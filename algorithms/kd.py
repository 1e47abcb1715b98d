"""Token-level knowledge distillation: forward KL to the teacher's cached top-p distribution.

    L(theta) = E_{s ~ D} [ KL( pi*_p(. | s) || pi_theta(. | s) ) ] + ce_coef * CE,
    pi*_p = the teacher's distribution renormalised on its top-p set A_p(s).

With ``student_norm = "vocab"`` the student is normalised over the whole vocabulary (classic KD restricted
to the teacher's support); with ``"top_p"`` it is projected onto A_p(s) too, which needs only the student's
logits on the set (the sparse head).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from algorithms.base import AlgoConfig, Algorithm, float_stats
from algorithms.bc import bc_loss
from tokenrl.core.distributions import kl, masked_mean, project_to_set, soft_value, upcast, vocab_logprobs
from tokenrl.core.options import NON_NEGATIVE, PROBABILITY, field_problems
from tokenrl.data.buffer import Batch


@dataclass
class KDConfig(AlgoConfig):
    """Token-level KD settings."""

    top_p: float = 0.8  # teacher distribution truncated to its top-p set (<= the cache's p; 1.0 = whole cache)
    student_norm: str = "vocab"  # "vocab": normalised over V; "top_p": projected onto the teacher's set (sparse head)
    ce_coef: float = 0.0  # weight of the cross-entropy on the data's tokens

    def problems(self) -> list[str]:
        """The optimiser's problems plus KD's ranges and ``student_norm``'s choices."""
        ranges = {"top_p": PROBABILITY, "ce_coef": NON_NEGATIVE}
        return super().problems() + field_problems(self, "algo", ranges, {"student_norm": ("vocab", "top_p")})


def kd_loss(
    student_logprobs_BTK: torch.Tensor,
    teacher_logprobs_BTK: torch.Tensor,
    cand_mask_BTK: torch.Tensor,
    state_mask_BT: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward KL from the renormalised teacher set distribution to the student.

    Args:
        student_logprobs_BTK: ``[B, T, K]`` student log-probs of the teacher's candidates (normalised over V,
            or over the set for the projection).
        teacher_logprobs_BTK: ``[B, T, K]`` teacher log-probs of the candidates (full-distribution values).
        cand_mask_BTK: ``[B, T, K]`` candidate validity.
        state_mask_BT: ``[B, T]`` states that enter the mean.

    Returns:
        ``(kl, teacher_set_mass)``: the mean KL (scalar) and the mean teacher mass of the sets.
    """
    t_lp_BTK = teacher_logprobs_BTK.float()
    kl_BT = kl(project_to_set(t_lp_BTK, cand_mask_BTK), upcast(student_logprobs_BTK), cand_mask_BTK)
    mass_BT = soft_value(t_lp_BTK, cand_mask_BTK).exp()
    return masked_mean(kl_BT, state_mask_BT), masked_mean(mass_BT, state_mask_BT)


class KD(Algorithm):
    """Forward KL to the cached teacher top-p distribution (plus optional CE)."""

    name = "kd"

    def compute_loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.config
        T = batch.actions_BT.shape[1]
        h_BTD = self.policy.state_hidden(batch)[:, :T]
        ids_BTK, mask_BTK = batch.cand_ids_BSK[:, :T], batch.cand_mask_BSK[:, :T]
        dense_needed = cfg.student_norm == "vocab" or cfg.ce_coef > 0
        logits_BTV = self.policy.dense_logits(h_BTD) if dense_needed else None
        if cfg.student_norm == "vocab":
            s_logp_BTK = vocab_logprobs(upcast(logits_BTV), ids_BTK)
        else:
            dense = logits_BTV is not None
            cand_BTK = logits_BTV.gather(-1, ids_BTK) if dense else self.policy.sparse_logits(h_BTD, ids_BTK)
            s_logp_BTK = project_to_set(upcast(cand_BTK), mask_BTK)
        kd_kl, mass = kd_loss(s_logp_BTK, batch.cand_logprobs_BSK[:, :T], mask_BTK, batch.action_mask_BT)
        loss = kd_kl
        stats = {}
        if cfg.ce_coef > 0:
            ce = bc_loss(logits_BTV, batch.actions_BT, batch.action_mask_BT)
            loss = loss + cfg.ce_coef * ce
            stats["loss/ce"] = ce
        stats["loss/total"], stats["loss/kl"] = loss, kd_kl
        stats["top_p/set_size"] = masked_mean(mask_BTK.sum(-1).float(), batch.action_mask_BT)
        stats["top_p/teacher_mass"] = mass
        return loss, float_stats(stats)
