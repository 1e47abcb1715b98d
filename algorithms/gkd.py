"""Generalized Knowledge Distillation (GKD): token-level generalized JSD on a mix of student and teacher data.

Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes"
(arXiv 2306.13649). At every state s of a sequence y (teacher sample, or with probability ``lmbda`` the
student's own sample, no gradient through the sampling):

    L(theta) = E_s[ JSD_beta( pi*(.|s) || pi_theta(.|s) ) ],
    JSD_beta(P || Q) = beta * KL(P || M) + (1 - beta) * KL(Q || M),  M = beta * P + (1 - beta) * Q,

with both distributions at temperature ``temperature``. As in TRL's ``GKDTrainer.generalized_jsd_loss``,
``beta = 0`` is the forward KL(teacher || student) and ``beta = 1`` the reverse KL(student || teacher)
(the endpoints are defined as these KLs, not as the limits of the mixture formula, which vanish).

Two forms, chosen by ``top_p``:

* ``top_p = 1.0`` (the default, the paper's): the JSD over the whole vocabulary (:func:`generalized_jsd_loss`)
  between the student's dense logits and the teacher's full-vocabulary log-probs at every state of the batch,
  which the trainer adds to each batch for this algorithm (``batch.teacher_logprobs_BSV``,
  :func:`tokenrl.lm.scoring.with_teacher_logprobs`), for teacher data and student rollouts alike;
* ``top_p < 1``: the JSD between the teacher renormalised on its cached top-p set and the student projected
  onto it (:func:`top_p_generalized_jsd_loss`). Nothing in this loss constrains the student's mass outside
  the set: on the default synthetic task that mass grows and the student's full-vocabulary samples degrade
  while the on-set KL falls (RESULTS.md).

The mix of student rollouts (fraction ``lmbda``) and teacher data is declared by the rollout hooks the
trainer calls: :meth:`GKD.rollout_policy` samples the student at temperature ``temperature``, restricted to
the teacher's set when ``top_p < 1`` (no gradient through the sampling), and the sampler of
:meth:`GKD.make_sampler` fills each batch with ``round(lmbda * batch_size)`` rows of the newest rollout batch
and the rest from ``is_expert=True`` teacher data; ``data/student_frac`` reports the mix it got. Batch fields read:
``teacher_logprobs_BSV`` (``top_p = 1``) or ``cand_ids_BSK``, ``cand_logprobs_BSK``, ``cand_mask_BSK``
(``top_p < 1``), and ``action_mask_BT``, ``is_expert_B`` and the model inputs.

Not as in the paper: there (and in TRL's ``GKDTrainer``) each whole batch is on-policy with probability
``lmbda``, here every batch holds the fraction ``lmbda`` of rollouts (the same expectation, less variance); the
paper distils T5 encoder-decoders with Adafactor. Its target is the teacher's full distribution, which on the
synthetic task includes the teacher's uniform smoothing floor, while the SFT start and the fixed-data half are
top-p-0.8 samples (``experiments/onpolicy_start.py --study gkd_target`` measures what that does). Optimiser:
like MiniLLM it fine-tunes a converged (SFT) student, so the shipped ``experiments/conf/algo/gkd.yaml`` uses a
constant lr after a short warm-up (see its comment).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from algorithms.base import AlgoConfig, Algorithm
from tokenrl.core.distributions import kl, masked_mean, project_to_set, upcast
from tokenrl.core.options import POSITIVE, PROBABILITY, UNIT_INTERVAL, field_problems
from tokenrl.core.top_p import PolicyFn
from tokenrl.data.buffer import Batch, require_teacher_logprobs
from tokenrl.data.samplers import RolloutMix


@dataclass
class GKDConfig(AlgoConfig):
    """GKD settings."""

    top_p: float = 1.0  # 1.0: JSD over the whole vocabulary; < 1: over the teacher's cached top-p set (<= the cache's p)
    beta: float = 0.5  # JSD interpolation: 0 = forward KL(teacher || student), 1 = reverse KL(student || teacher)
    temperature: float = 1.0  # both distributions are softmax(logits / temperature)
    lmbda: float = 0.5  # fraction of each batch drawn from the newest student rollouts (make_sampler)
    sparse: bool = True  # top_p < 1: student logits on the set as h @ W[ids]^T instead of dense logits
    # Optimiser: GKD fine-tunes a converged (SFT) student: a constant lr after 20 warm-up steps, clipping at 1
    # (the shape MiniLLM's release uses). lr 3e-5, not the benchmark's choice: the benchmark chose 3.2e-4 by the
    # teacher-forced KL, where GKD's samples at top-p 1.0 are the table's worst (RESULTS.md); 1e-3 trips the
    # divergence guard from the default SFT start.
    lr: float = 3e-5
    warmup_steps: int = 20
    min_lr_ratio: float = 1.0  # constant after the warm-up

    def problems(self) -> list[str]:
        """The optimiser's problems plus GKD's ranges."""
        ranges = {"top_p": PROBABILITY, "beta": UNIT_INTERVAL, "temperature": POSITIVE, "lmbda": UNIT_INTERVAL}
        return super().problems() + field_problems(self, "algo", ranges)

    def reads_cached_sets(self) -> bool:
        """``top_p = 1`` reads the teacher's full-vocabulary log-probs from the batch, not the cache."""
        return self.top_p < 1.0


def generalized_jsd(
    student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float, mask: torch.Tensor
) -> torch.Tensor:
    """Per-state JSD(beta) between two normalised distributions over a candidate set.

    Args:
        student_logp: ``[..., K]`` student log-probs, normalised over the valid candidates.
        teacher_logp: ``[..., K]`` teacher log-probs, normalised over the valid candidates.
        beta: interpolation in [0, 1] (0: KL(teacher || student), 1: KL(student || teacher)).
        mask: ``[..., K]`` bool candidate validity.

    Returns:
        ``[...]`` divergences (0 for an all-invalid row).
    """
    if beta == 0.0:
        return kl(teacher_logp, student_logp, mask)
    if beta == 1.0:
        return kl(student_logp, teacher_logp, mask)
    # Invalid slots hold -inf log-probs: zero them first so the mixture's gradient never sees -inf - -inf.
    student_logp, teacher_logp = student_logp.masked_fill(~mask, 0.0), teacher_logp.masked_fill(~mask, 0.0)
    b = torch.tensor(beta, dtype=student_logp.dtype, device=student_logp.device)
    mix_logp = torch.logaddexp(student_logp + torch.log1p(-b), teacher_logp + torch.log(b))
    return beta * kl(teacher_logp, mix_logp, mask) + (1 - beta) * kl(student_logp, mix_logp, mask)


def generalized_jsd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    beta: float,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean per-token JSD(beta) between full-vocabulary student and teacher distributions (TRL's convention).

    Args:
        student_logits: ``[B, T, V]`` student logits.
        teacher_logits: ``[B, T, V]`` teacher logits (no gradient is taken through them).
        beta: interpolation in [0, 1].
        temperature: both distributions are ``softmax(logits / temperature)``.
        mask: ``[B, T]`` bool positions entering the mean; None = all.

    Returns:
        Scalar mean over the masked positions (0 when none).
    """
    s_logp = project_to_set(upcast(student_logits) / temperature)
    t_logp = project_to_set(upcast(teacher_logits.detach()) / temperature)
    valid = torch.ones_like(s_logp, dtype=torch.bool)
    jsd_BT = generalized_jsd(s_logp, t_logp, beta, valid)
    if mask is None:
        mask = torch.ones(jsd_BT.shape, dtype=torch.bool, device=jsd_BT.device)
    return masked_mean(jsd_BT, mask)


def top_p_generalized_jsd_loss(
    student_logits_BTK: torch.Tensor,
    teacher_logprobs_BTK: torch.Tensor,
    cand_mask_BTK: torch.Tensor,
    state_mask_BT: torch.Tensor,
    beta: float,
    temperature: float = 1.0,
) -> torch.Tensor:
    """JSD(beta) over the teacher's cached set: teacher renormalised on it, student projected onto it.

    Temperature divides the teacher's cached log-probs, which differ from its logits by a per-state constant
    that the renormalisation removes, so this equals :func:`generalized_jsd_loss` on the set's logits.

    Args:
        student_logits_BTK: ``[B, T, K]`` student logits of the set's ids.
        teacher_logprobs_BTK: ``[B, T, K]`` teacher log-probs of the ids (full-distribution values).
        cand_mask_BTK: ``[B, T, K]`` bool set membership.
        state_mask_BT: ``[B, T]`` bool states entering the mean.
        beta: interpolation in [0, 1].
        temperature: softmax temperature of both distributions.

    Returns:
        Scalar mean over states with a non-empty set.
    """
    s_logp = project_to_set(upcast(student_logits_BTK) / temperature, cand_mask_BTK)
    t_logp = project_to_set(upcast(teacher_logprobs_BTK.detach()) / temperature, cand_mask_BTK)
    ok_BT = state_mask_BT & cand_mask_BTK.any(-1)
    return masked_mean(generalized_jsd(s_logp, t_logp, beta, cand_mask_BTK), ok_BT)


class GKD(Algorithm):
    """On-policy generalized JSD to the teacher: over the whole vocabulary, or its cached top-p set (``top_p < 1``)."""

    name = "gkd"

    @property
    def needs_teacher_logprobs(self) -> bool:
        """``top_p = 1``: the loss reads the teacher's full-vocabulary log-probs from every batch."""
        return self.top_p >= 1.0

    @property
    def needs_rollouts(self) -> bool:
        """Student rollouts enter the batches only when ``lmbda > 0`` (``lmbda = 0``: supervised, teacher data)."""
        return self.config.lmbda > 0

    def rollout_policy(self, student_fn: PolicyFn, teacher_fn: PolicyFn) -> PolicyFn:
        """The student at temperature ``temperature``, inside the teacher's top-p set when ``top_p < 1``."""
        restricted = super().rollout_policy(student_fn, teacher_fn)
        temperature = self.config.temperature

        def policy_fn(tokens_BL: torch.Tensor, lengths_B: torch.Tensor) -> torch.Tensor:
            return restricted(tokens_BL, lengths_B) / temperature

        return policy_fn

    @classmethod
    def make_sampler(cls, config: GKDConfig) -> RolloutMix:
        """``round(lmbda * batch_size)`` rows of the newest rollout batch, the rest teacher data."""
        return RolloutMix(config.lmbda)

    def compute_loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.config
        T = batch.actions_BT.shape[1]
        h_BTD = self.policy.state_hidden(batch)[:, :T]
        stats = {"data/student_frac": float((~batch.is_expert_B).float().mean())}
        if self.needs_teacher_logprobs:
            teacher_logp_BTV = require_teacher_logprobs(batch, self.name)[:, :T]
            loss = generalized_jsd_loss(
                self.policy.dense_logits(h_BTD), teacher_logp_BTV, cfg.beta, cfg.temperature, batch.action_mask_BT
            )
        else:
            ids_BTK, mask_BTK = batch.cand_ids_BSK[:, :T], batch.cand_mask_BSK[:, :T]
            if cfg.sparse:
                logits_BTK = self.policy.sparse_logits(h_BTD, ids_BTK)
            else:
                logits_BTK = self.policy.dense_logits(h_BTD).gather(-1, ids_BTK)
            loss = top_p_generalized_jsd_loss(
                logits_BTK, batch.cand_logprobs_BSK[:, :T], mask_BTK, batch.action_mask_BT, cfg.beta, cfg.temperature
            )
            stats["top_p/set_size"] = float(masked_mean(mask_BTK.sum(-1).float(), batch.action_mask_BT))
        stats["loss/total"] = stats["loss/jsd"] = float(loss.detach())
        return loss, stats
