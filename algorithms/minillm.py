"""MiniLLM: sequence-level reverse-KL distillation by policy gradient on the student's own rollouts.

Gu et al. 2024, "MiniLLM: Knowledge Distillation of Large Language Models" (arXiv 2306.08543). The student
minimises KL(pi_theta || pi*) over whole responses y ~ pi_theta(.|x), i.e. maximises the return of the
per-token reward ``r_t = log pi*(y_t|s_t) - log pi_theta(y_t|s_t)``. With ``R_{t+1} = sum_{t' > t} r_t'``:

    grad KL = E_y[ sum_t grad KL(pi_theta(.|s_t) || pi*(.|s_t))           (single-step part, exact)
                   - sum_t (R_{t+1} - b_t) grad log pi_theta(y_t|s_t) ]    (long-term part, policy gradient)

The single-step part is computed exactly, so only the long-term part is sampled. With ``top_p = 1.0`` (the
default, the paper's) the single-step KL, the rewards and the importance weights are over the whole
vocabulary, from the teacher's full-vocabulary log-probs that the trainer adds to every batch for this
algorithm (``batch.teacher_logprobs_BSV``, :func:`tokenrl.lm.scoring.with_teacher_logprobs`); with ``top_p < 1``
they are over the teacher's cached top-p set (student projected onto it, teacher renormalised on it,
rollouts sampled inside it), which leaves the student's mass outside the set unconstrained. Of the paper's
three tricks all are implemented:

1. single-step decomposition: the exact per-state KL above;
2. teacher-mixed sampling: rollouts come from ``mix * pi* + (1 - mix) * pi_theta``
   (:func:`mixed_policy_fn`), corrected by the per-token importance weight
   ``rho_t = pi_theta(y_t|s_t) / pi_mix(y_t|s_t)`` (the paper's per-token approximation of the prefix product);
3. length normalisation: ``R_{t+1}`` is divided by the number of future tokens (``length_norm``), so long
   responses are not penalised for summing more negative rewards.

The pre-training loss of the paper (added to the objective following InstructGPT's PPO-ptx) is on by default:

    L_PT(theta) = - E_{d ~ D_PT} [ log pi_theta(d) ],        L = L_KL + pt_coef * L_PT,   pt_coef = 1 (paper),

on a batch of the task's pre-training corpus that the trainer attaches to every batch (``batch.lm_batch``,
:mod:`tokenrl.tasks.corpus`: free text of the synthetic language, or a text file / the teacher's unconditional
samples on a transformers task; the paper's is OpenWebText). Like the paper's (and :func:`minillm_loss`), it is
per sequence: the NLL summed over each row's tokens, averaged over rows. ``pt_coef = 0`` turns it off (no
corpus is built then). The synthetic corpus is drawn at the data's top-p by default: on text drawn at top-p 1.0
the PT term teaches the synthetic teacher's uniform smoothing floor, and from the default SFT start MiniLLM's
samples then got worse (``experiments/onpolicy_start.py``; :mod:`tokenrl.tasks.corpus`).

Rollouts are reused PPO-style: ``rho_t`` is taken against the behaviour policy the rollout came from (the
snapshot :meth:`MiniLLM.sync_behaviour` takes in :meth:`MiniLLM.before_rollout`) and clipped to
``[1 - clip_eps, 1 + clip_eps]``. The baseline ``b_t`` is the leave-one-out mean of ``R_{t+1}`` over the other
rows at the same position (independent of the row's own sample, so the estimator stays unbiased).
Teacher rows (``is_expert``) were sampled by the teacher: their behaviour log-prob is the teacher's.

Not as in the paper or its release: the release's PT loss mixes 0.5 CE with 0.5 token KD to the teacher
(``--kd-ratio 0.5``) and averages both losses per token rather than per sequence; its policy-gradient return is
discounted (gamma 0.95 in its arguments) where ours is not, and its advantages are whitened over the batch where
ours subtract a leave-one-out baseline; its rewards are scaled (``--reward-scaling 0.5``). Optimiser: the
release fine-tunes an SFT student at a constant lr 5e-6 after 100 warm-up steps with gradient clipping at 1; the
shipped ``experiments/conf/algo/minillm.yaml`` keeps the constant schedule and the short warm-up at an lr for
this task's small student (see its comment).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from algorithms.base import AlgoConfig, Algorithm
from tokenrl.core.distributions import kl, masked_mean, project_to_set, upcast
from tokenrl.core.options import HALF_OPEN_UNIT, NON_NEGATIVE, POSITIVE, PROBABILITY, field_problems
from tokenrl.core.top_p import PolicyFn, restrict_logits_to_top_p
from tokenrl.data.buffer import Batch, require_lm_batch, require_teacher_logprobs
from tokenrl.data.samplers import RolloutMix
from tokenrl.lm.policy import CausalLMPolicy


@dataclass
class MiniLLMConfig(AlgoConfig):
    """MiniLLM settings (the paper: mix 0.2, clip 0.2, length normalisation on)."""

    top_p: float = 1.0  # 1.0: everything over the whole vocabulary; < 1: over the teacher's cached top-p set
    mix: float = 0.2  # teacher weight of the rollout policy mix * pi* + (1 - mix) * pi_theta (0 = pure student)
    clip_eps: float = 0.2  # importance weights clipped to [1 - clip_eps, 1 + clip_eps]
    length_norm: bool = True  # divide R_{t+1} by the number of future tokens
    baseline: bool = True  # subtract the leave-one-out mean of R_{t+1} over the batch at each position
    sparse: bool = True  # top_p < 1: student logits on the set as h @ W[ids]^T instead of dense logits
    pt_coef: float = 1.0  # weight of the pre-training loss on a corpus batch (paper: 1; 0 = off, no corpus)
    # Optimiser: MiniLLM fine-tunes a converged (SFT) student; its release uses a constant lr (5e-6 for GPT-2)
    # after 100 warm-up steps of 5000, clipping at 1. The same shape here (constant after 20 warm-up steps) at an
    # lr for this task's small student, tuned by the benchmark (RESULTS.md; 1e-3, the SFT peak, collapses it).
    lr: float = 1e-4
    warmup_steps: int = 20
    min_lr_ratio: float = 1.0  # constant after the warm-up

    def problems(self) -> list[str]:
        """The optimiser's problems plus MiniLLM's ranges."""
        ranges = {"top_p": PROBABILITY, "mix": HALF_OPEN_UNIT, "clip_eps": POSITIVE, "pt_coef": NON_NEGATIVE}
        return super().problems() + field_problems(self, "algo", ranges)

    def reads_cached_sets(self) -> bool:
        """``top_p = 1`` reads the teacher's full-vocabulary log-probs from the batch, not the cache."""
        return self.top_p < 1.0


def mixed_policy_fn(student_fn: PolicyFn, teacher_fn: PolicyFn, mix: float) -> PolicyFn:
    """The rollout policy ``mix * pi_teacher + (1 - mix) * pi_student`` as logits, for ``env.rollout``.

    Args:
        student_fn: ``(tokens_BT, lengths_B) -> logits_BV`` of the student (e.g. already restricted with
            :func:`tokenrl.core.top_p.top_p_restricted_policy`).
        teacher_fn: ``(tokens_BT, lengths_B) -> logits_BV`` of the teacher, restricted the same way
            (e.g. ``restrict_logits_to_top_p(t, t, p)``), so the loss's importance weights match.
        mix: teacher weight in [0, 1).

    Returns:
        ``policy_fn(tokens_BT, lengths_B) -> logits_BV`` = log of the mixture's probabilities.
    """
    if not 0.0 <= mix < 1.0:
        raise ValueError(f"mix must be in [0, 1), got {mix}")

    def policy_fn(tokens_BT: torch.Tensor, lengths_B: torch.Tensor) -> torch.Tensor:
        s_logp = project_to_set(student_fn(tokens_BT, lengths_B).float())
        t_logp = project_to_set(teacher_fn(tokens_BT, lengths_B).float().to(s_logp.device))
        return mixture_logprobs(s_logp, t_logp, mix)

    return policy_fn


def mixture_logprobs(student_logp: torch.Tensor, teacher_logp: torch.Tensor, mix: float) -> torch.Tensor:
    """``log(mix * pi_teacher + (1 - mix) * pi_student)`` elementwise from log-probs (any shape)."""
    if mix == 0.0:
        return student_logp
    return torch.logaddexp(student_logp + math.log1p(-mix), teacher_logp + math.log(mix))


def minillm_loss(
    logp_BT: torch.Tensor,
    behaviour_logp_BT: torch.Tensor,
    teacher_logp_BT: torch.Tensor,
    kl_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    clip_eps: float = 0.2,
    length_norm: bool = True,
    baseline: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Surrogate loss whose gradient is MiniLLM's estimate of grad KL(pi_theta || pi*) per sequence.

    Args:
        logp_BT: ``[B, T]`` current student log-probs of the taken tokens (with gradient).
        behaviour_logp_BT: ``[B, T]`` log-probs of the taken tokens under the policy that sampled them.
        teacher_logp_BT: ``[B, T]`` teacher log-probs of the taken tokens.
        kl_BT: ``[B, T]`` exact KL(pi_theta(.|s_t) || pi*(.|s_t)) at the visited states (with gradient).
        mask_BT: ``[B, T]`` bool valid positions; each row's valid positions are a prefix.
        clip_eps: importance weights are clipped to ``[1 - clip_eps, 1 + clip_eps]`` (PPO's surrogate).
        length_norm: divide ``R_{t+1}`` by the number of future tokens.
        baseline: subtract the leave-one-out mean of ``R_{t+1}`` at the same position.

    Returns:
        ``(loss, stats)``: the loss summed over positions and averaged over rows (its gradient estimates
        the gradient of the sequence-level reverse KL), and detached diagnostics.
    """
    mask_f = mask_BT.to(logp_BT.dtype)
    reward_BT = ((teacher_logp_BT - logp_BT).detach() * mask_f).nan_to_num(0.0, posinf=0.0, neginf=0.0)
    future_BT = reward_BT.flip(-1).cumsum(-1).flip(-1) - reward_BT  # R_{t+1}
    if length_norm:
        n_future_BT = mask_f.flip(-1).cumsum(-1).flip(-1) - mask_f
        future_BT = future_BT / n_future_BT.clamp_min(1.0)
    advantage_BT = future_BT
    if baseline:
        count_T = mask_f.sum(0)
        loo_BT = (future_BT.sum(0, keepdim=True) - future_BT) / (count_T - 1).clamp_min(1.0)
        advantage_BT = future_BT - torch.where(count_T > 1, loo_BT, torch.zeros_like(loo_BT))
    advantage_BT = advantage_BT * mask_f
    rho_BT = torch.exp(torch.where(mask_BT, logp_BT - behaviour_logp_BT.detach(), torch.zeros_like(logp_BT)))
    rho_clipped_BT = rho_BT.clamp(1 - clip_eps, 1 + clip_eps)
    pg_BT = -torch.minimum(rho_BT * advantage_BT, rho_clipped_BT * advantage_BT)
    single_BT = rho_clipped_BT.detach() * kl_BT
    n_rows = max(mask_BT.shape[0], 1)
    long_term = (pg_BT * mask_f).sum() / n_rows
    single_step = (single_BT * mask_f).sum() / n_rows
    stats = {
        "loss/long_term": long_term.detach(),
        "loss/single_step": single_step.detach(),
        "reward/mean": masked_mean(reward_BT, mask_BT),
        "kl/token_mean": masked_mean(kl_BT.detach(), mask_BT),
        "is/rho_mean": masked_mean(rho_BT.detach(), mask_BT),
        "is/clip_frac": masked_mean(((rho_BT - rho_clipped_BT).abs() > 0).float().detach(), mask_BT),
    }
    return long_term + single_step, stats


def pt_loss(nll_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """MiniLLM's pre-training loss ``- E_d[log pi_theta(d)]``: the NLL summed over each row's tokens, averaged over
    rows (per sequence, the scale of :func:`minillm_loss`).

    Args:
        nll_BT: ``[B, T]`` full-vocabulary NLL of the corpus batch's tokens.
        mask_BT: ``[B, T]`` bool valid tokens.
    """
    return (nll_BT * mask_BT.to(nll_BT.dtype)).sum() / max(mask_BT.shape[0], 1)


def action_slots(actions_BT: torch.Tensor, cand_ids_BTK: torch.Tensor, cand_mask_BTK: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` slot of each taken action among its state's valid candidates, -1 if outside the set."""
    match_BTK = (cand_ids_BTK == actions_BT[..., None]) & cand_mask_BTK
    return torch.where(match_BTK.any(-1), match_BTK.long().argmax(-1), torch.full_like(actions_BT, -1))


class MiniLLM(Algorithm):
    """Reverse-KL policy gradient with the exact single-step part, teacher-mixed sampling and clipping.

    The trainer's rollouts go through the hooks (the algorithm itself never samples):

    * :meth:`rollout_policy`: ``mixed_policy_fn(student, teacher, config.mix)`` with both restricted to the
      teacher's top-p set at ``config.top_p``; the trajectories are added with ``is_expert=False`` and their
      teacher cache;
    * :meth:`before_rollout` calls :meth:`sync_behaviour` (no update between the snapshot and the sampling),
      so the importance weights are taken against the policy that sampled;
    * the sampler of :meth:`make_sampler` draws every row from the newest rollout batch (reused PPO-style until
      the next one, the clipping bounding the drift), so all weights are taken against the snapshot that sampled
      them.

    Batch fields read: ``actions_BT``, ``action_mask_BT``, ``is_expert_B``, the model inputs, and
    ``teacher_logprobs_BSV`` (``top_p = 1``) or ``cand_ids_BSK``, ``cand_logprobs_BSK``, ``cand_mask_BSK``
    (``top_p < 1``), and ``lm_batch`` (the corpus batch of the PT loss) when ``pt_coef > 0``.
    """

    name = "minillm"
    needs_rollouts = True

    @property
    def needs_lm_batch(self) -> bool:
        """The PT loss (``pt_coef > 0``) reads a batch of the task's pre-training corpus."""
        return self.config.pt_coef > 0

    @property
    def needs_teacher_logprobs(self) -> bool:
        """``top_p = 1``: the loss reads the teacher's full-vocabulary log-probs from every batch."""
        return self.top_p >= 1.0

    def __init__(self, policy: CausalLMPolicy, config: MiniLLMConfig, total_steps: int = 1000):
        super().__init__(policy, config, total_steps)
        self.behaviour = copy.deepcopy(policy).requires_grad_(False)

    def sync_behaviour(self) -> None:
        """Snapshot the student as the behaviour policy; call when new rollouts are collected with it."""
        self.behaviour.load_state_dict(self.policy.state_dict())

    def rollout_policy(self, student_fn: PolicyFn, teacher_fn: PolicyFn) -> PolicyFn:
        """``mix * pi* + (1 - mix) * pi_theta``, both restricted to the teacher's top-p set when ``top_p < 1``."""
        student = super().rollout_policy(student_fn, teacher_fn)
        p = self.top_p
        if p >= 1.0:
            return mixed_policy_fn(student, teacher_fn, self.config.mix)

        def teacher(tokens_BL: torch.Tensor, lengths_B: torch.Tensor) -> torch.Tensor:
            logits_BV = teacher_fn(tokens_BL, lengths_B)
            return restrict_logits_to_top_p(logits_BV, logits_BV, p)

        return mixed_policy_fn(student, teacher, self.config.mix)

    def before_rollout(self) -> None:
        """Snapshot the behaviour policy that is about to sample (:meth:`sync_behaviour`)."""
        self.sync_behaviour()

    @classmethod
    def make_sampler(cls, config: MiniLLMConfig) -> RolloutMix:
        """Every row from the newest rollout batch (uniform, with replacement)."""
        return RolloutMix(1.0)

    def _logprobs(self, policy: CausalLMPolicy, batch: Batch, mask_BTK: torch.Tensor | None) -> torch.Tensor:
        """``[B, T, V]`` log-probs over the vocabulary (``mask_BTK`` None), else ``[B, T, K]`` projected on the set."""
        T = batch.actions_BT.shape[1]
        h_BTD = policy.state_hidden(batch)[:, :T]
        if mask_BTK is None:
            return project_to_set(upcast(policy.dense_logits(h_BTD)))
        ids_BTK = batch.cand_ids_BSK[:, :T]
        if self.config.sparse:
            logits_BTK = policy.sparse_logits(h_BTD, ids_BTK)
        else:
            logits_BTK = policy.dense_logits(h_BTD).gather(-1, ids_BTK)
        return project_to_set(upcast(logits_BTK), mask_BTK)

    def compute_loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.config
        T = batch.actions_BT.shape[1]
        if self.needs_teacher_logprobs:
            # The whole vocabulary: every action has a slot, its token id.
            mask_BTK = None
            t_logp_BTK = require_teacher_logprobs(batch, self.name)[:, :T]
            slot_BT = batch.actions_BT
            state_ok_BT = batch.action_mask_BT
        else:
            mask_BTK = batch.cand_mask_BSK[:, :T]
            t_logp_BTK = project_to_set(upcast(batch.cand_logprobs_BSK[:, :T]), mask_BTK)
            slot_BT = action_slots(batch.actions_BT, batch.cand_ids_BSK[:, :T], mask_BTK)
            state_ok_BT = batch.action_mask_BT & mask_BTK.any(-1)
        s_logp_BTK = self._logprobs(self.policy, batch, mask_BTK)
        t_logp_BTK = t_logp_BTK.to(s_logp_BTK.dtype)
        with torch.no_grad():
            self.behaviour.eval()
            b_logp_BTK = self._logprobs(self.behaviour, batch, mask_BTK)
        valid_BT = state_ok_BT & (slot_BT >= 0)

        def taken(x_BTK: torch.Tensor) -> torch.Tensor:
            g = x_BTK.gather(-1, slot_BT.clamp_min(0)[..., None])[..., 0]
            return torch.where(valid_BT, g, torch.zeros_like(g))

        logp_BT, teacher_logp_BT = taken(s_logp_BTK), taken(t_logp_BTK)
        behaviour_BT = mixture_logprobs(taken(b_logp_BTK), teacher_logp_BT, cfg.mix)
        # Teacher data was sampled by the teacher: that is its behaviour policy.
        behaviour_BT = torch.where(batch.is_expert_B[:, None], teacher_logp_BT, behaviour_BT)
        kl_BT = kl(s_logp_BTK, t_logp_BTK, mask_BTK)  # KL(pi_theta || pi*) per state
        loss, stats = minillm_loss(
            logp_BT, behaviour_BT, teacher_logp_BT, kl_BT, valid_BT, cfg.clip_eps, cfg.length_norm, cfg.baseline
        )
        out = {k: float(v) for k, v in stats.items()}
        if cfg.pt_coef > 0:
            lm = require_lm_batch(batch, self.name)
            h_lm_BTD = self.policy.state_hidden(lm)[:, : lm.actions_BT.shape[1]]
            pt = pt_loss(self.policy.action_nll(h_lm_BTD, lm.actions_BT), lm.action_mask_BT)
            loss = loss + cfg.pt_coef * pt
            out["loss/pt"] = float(pt.detach())
        out["loss/total"] = float(loss.detach())
        out["top_p/action_outside_frac"] = float(masked_mean((~valid_BT).float(), batch.action_mask_BT))
        out["data/student_frac"] = float((~batch.is_expert_B).float().mean())
        return loss, out

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["behaviour"] = self.behaviour.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.behaviour.load_state_dict(state["behaviour"])
