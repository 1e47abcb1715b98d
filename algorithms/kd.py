"""Token-level knowledge distillation: forward KL to the teacher's cached top-p distribution.

    L(theta) = E_{s ~ D} [ KL( pi*_p(. | s) || pi_theta(. | s) ) ] + ce_coef * CE + pbc_coef * PBC,
    pi*_p = the teacher's distribution renormalised on its top-p set A_p(s),
    PBC   = - E_{(s, a) ~ D} [ log pi_theta,p(a | s) ],   pi_theta,p = the student projected onto A_p(s).

With ``student_norm = "vocab"`` the student is normalised over the whole vocabulary (classic KD restricted
to the teacher's support); with ``"top_p"`` it is projected onto A_p(s) too, which needs only the student's
logits on the set (the sparse head).

Registered as ``kd``; the preset ``kd_pbc`` (``experiments/conf/algo/kd_pbc.yaml``: KD + projected BC,
``pbc_coef = 1``) is the matched-information arm: the
information Bellman Distill + KD (``bd_kd``) trains on (the teacher's cached set probabilities and the data's
tokens scored by the projected student) without BD's TD terms, so a table of kd, kd_pbc and bd_kd shows what
the TD part adds at equal information.

:func:`lm_batch_loss` is the language-modelling term (CE and KD on a batch's own tokens) that MiniLLM and Bellman
Distill compute on a pre-training batch (``batch.lm_batch``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from algorithms.base import AlgoConfig, Algorithm, float_stats
from algorithms.bc import bc_loss
from tokenrl.core.backup import gather_action
from tokenrl.core.distributions import kl, masked_mean, project_to_set, soft_value, upcast, vocab_logprobs
from tokenrl.core.options import NON_NEGATIVE, PROBABILITY, field_problems
from tokenrl.data.buffer import Batch
from tokenrl.lm.policy import CausalLMPolicy


@dataclass
class KDConfig(AlgoConfig):
    """Token-level KD settings."""

    top_p: float = 0.8  # teacher distribution truncated to its top-p set (<= the cache's p; 1.0 = whole cache)
    student_norm: str = "vocab"  # "vocab": normalised over V; "top_p": projected onto the teacher's set (sparse head)
    ce_coef: float = 0.0  # weight of the cross-entropy on the data's tokens
    pbc_coef: float = 0.0  # weight of projected BC: the data token's NLL under the student projected onto the set

    def problems(self) -> list[str]:
        """The optimiser's problems plus KD's ranges and ``student_norm``'s choices."""
        ranges = {"top_p": PROBABILITY, "ce_coef": NON_NEGATIVE, "pbc_coef": NON_NEGATIVE}
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


def projected_bc_loss(
    student_logits_BTK: torch.Tensor, cand_mask_BTK: torch.Tensor, action_slot_BT: torch.Tensor
) -> torch.Tensor:
    """Projected behaviour cloning: ``- E[log pi_p(a | s)]``, the NLL of the data's token under the student
    renormalised on the teacher's top-p set (the policy Bellman Distill's TD terms act on).

    Args:
        student_logits_BTK: ``[B, T, K]`` student logits of the set's ids.
        cand_mask_BTK: ``[B, T, K]`` bool set membership.
        action_slot_BT: ``[B, T]`` slot of the data's token in its state's set, -1 outside the set or on padding
            (those steps have no projected log-probability and are left out).

    Returns:
        Scalar mean over the steps whose token lies in the set (0 when none).
    """
    logp_BTK = project_to_set(upcast(student_logits_BTK), cand_mask_BTK)
    return masked_mean(-gather_action(logp_BTK, action_slot_BT), action_slot_BT >= 0)


def kd_term_problems(kd_coef: float, top_p: float) -> list[str]:
    """The problem of a token KD term to the teacher's cached set in the full-vocabulary MDP (``top_p = 1``), which
    has no set: the BD configs' shared rule."""
    if kd_coef > 0 and top_p >= 1.0:
        return [f"algo.kd_coef={kd_coef} with algo.top_p={top_p}: the KD term reads the teacher's cached set, which "
                "the full-vocabulary MDP has not; set algo.kd_coef=0 or algo.top_p<1"]
    return []


def lm_batch_loss(
    policy: CausalLMPolicy, batch: Batch, ce_coef: float, kd_coef: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The language-modelling term ``ce_coef * CE + kd_coef * KD`` on ``batch``'s own tokens.

    CE is the full-vocabulary NLL of the tokens (:meth:`CausalLMPolicy.action_nll`, flat memory); KD is
    :func:`kd_loss` from the teacher's cached set distribution to the student normalised over the vocabulary
    (the batch's sets at its ``top_p``). MiniLLM's PT term and Bellman Distill's ``lm_batch = "corpus"`` compute
    it on the pre-training batch.

    Args:
        policy: the student.
        batch: the batch whose tokens are scored (e.g. ``batch.lm_batch``).
        ce_coef, kd_coef: weights, at least one > 0.

    Returns:
        ``(loss, stats)`` with ``loss/lm`` (CE) and ``loss/kd`` for the terms with a positive weight.
    """
    if ce_coef <= 0 and kd_coef <= 0:
        raise ValueError(f"lm_batch_loss needs ce_coef > 0 or kd_coef > 0, got {ce_coef}, {kd_coef}")
    T = batch.actions_BT.shape[1]
    h_BTD = policy.state_hidden(batch)[:, :T]
    terms, stats = [], {}
    if ce_coef > 0:
        stats["loss/lm"] = masked_mean(policy.action_nll(h_BTD, batch.actions_BT), batch.action_mask_BT)
        terms.append(ce_coef * stats["loss/lm"])
    if kd_coef > 0:
        s_logp_BTK = vocab_logprobs(upcast(policy.dense_logits(h_BTD)), batch.cand_ids_BSK[:, :T])
        stats["loss/kd"], _ = kd_loss(
            s_logp_BTK, batch.cand_logprobs_BSK[:, :T], batch.cand_mask_BSK[:, :T], batch.action_mask_BT
        )
        terms.append(kd_coef * stats["loss/kd"])
    return sum(terms[1:], terms[0]), stats


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
        cand_BTK = None  # the student's logits on the set, when a term reads them
        if cfg.student_norm == "top_p" or cfg.pbc_coef > 0:
            dense = logits_BTV is not None
            cand_BTK = logits_BTV.gather(-1, ids_BTK) if dense else self.policy.sparse_logits(h_BTD, ids_BTK)
        if cfg.student_norm == "vocab":
            s_logp_BTK = vocab_logprobs(upcast(logits_BTV), ids_BTK)
        else:
            s_logp_BTK = project_to_set(upcast(cand_BTK), mask_BTK)
        kd_kl, mass = kd_loss(s_logp_BTK, batch.cand_logprobs_BSK[:, :T], mask_BTK, batch.action_mask_BT)
        loss = kd_kl
        stats = {}
        if cfg.ce_coef > 0:
            ce = bc_loss(logits_BTV, batch.actions_BT, batch.action_mask_BT)
            loss = loss + cfg.ce_coef * ce
            stats["loss/ce"] = ce
        if cfg.pbc_coef > 0:
            pbc = projected_bc_loss(cand_BTK, mask_BTK, batch.action_slot_BT)
            loss = loss + cfg.pbc_coef * pbc
            stats["loss/pbc"] = pbc
        stats["loss/total"], stats["loss/kl"] = loss, kd_kl
        stats["top_p/set_size"] = masked_mean(mask_BTK.sum(-1).float(), batch.action_mask_BT)
        stats["top_p/teacher_mass"] = mass
        return loss, float_stats(stats)

