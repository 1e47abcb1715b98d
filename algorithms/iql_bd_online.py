"""Online Bellman Distill: IQ-Learn's online form on the teacher's top-p MDP, with the student's own states.

Offline BD (:mod:`algorithms.iql_bd`) reads teacher transitions only; with every data action in the set it is
projected BC plus a penalty on the implicit reward (docs/bd_diagnosis.md), so no state off the teacher's data
enters its loss. IQ-Learn's online objective (Garg et al. 2021, arXiv 2106.12142) puts the learner's own
transitions into the value and chi^2 terms. Here, with A_p(s) the teacher's top-p set, pi_p the student projected
onto it, D the offline teacher data and E_mix the token mean over a mixture of sequences that come from the
student's own rollouts through the env (sampled from pi_p, each state's set from the teacher itself) with
probability ``lmbda`` and from D otherwise, the loss minimised is

    -J(Q) = -E_D[ r(s, a) ] + E_mix[ V(s) - gamma V(s') ] + E_mix[ r(s, a)^2 ] / (4 alpha),
    r(s, a) = Q(s, a) - gamma V(s'),     V(s) = log sum_{a in A_p(s)} exp Q(s, a)   (0 after EOS),
    E_mix[f] = ((1 - lmbda) E_{y~D}[sum_t f] + lmbda E_{y~pi_p}[sum_t f]) / ((1 - lmbda) E_D|y| + lmbda E_pi_p|y|)

plus the LM term of the fixed offline form (``ce_coef``: full-vocabulary CE of the teacher tokens, on D only).
At ``lmbda = 0`` the mixture is D and, as -E[r] + E[r^2] / (4 alpha) = -E[phi(r)], the loss is offline BD's math
form with the same options exactly (tested). Q (``q_param``):

* ``logits``: the student's logits shifted by their max over the set (``q_shift="set"``, the fixed default; or the
  paper's vocabulary max), clipped at ``q_min``; V is then ``-log pi_p(argmax | s) in [0, log |A_p|]``, a level
  pinned by the shift;
* ``free_level``: ``Q(s, a) = log pi_p(a|s) + V_theta(s)``, with V_theta a scalar head on the student's final
  hidden state (:meth:`~tokenrl.lm.policy.CausalLMPolicy.add_value_head`, zero at the start), so V(s) = V_theta(s)
  exactly: the level is free, and no shift ties the set to the tokens outside it (the exact diagnosis shows that
  the pinned level is what moves mass out of the set). The head trains, is clipped and is checkpointed with the
  student (the policy's ``state_dict``); the saved student is the plain LM.

What each batch row contributes. A teacher row (``is_expert``): the expert term ``-r`` at each step whose action
is in the set (mean over the teacher rows' steps), its steps' ``V(s) - gamma V(s')`` and ``r^2`` to the mixture
means with weight ``(1 - lmbda) / n_teacher_rows``, and the CE term. A rollout row: its steps' ``V(s) - gamma V(s')``
and ``r^2`` (its own action, in the set) with weight ``lmbda / n_rollout_rows``, nothing else (the student's own
tokens are no targets). These row weights make the batch's weighted token means the estimates of E_mix above
whatever the rows' split (``rollout_frac`` of the rows are rollouts); a batch without rollout rows gives the
offline terms. Through the rollouts the value term lowers V at the student's states and the chi^2 pulls the
implicit reward of its own actions to 0: with the free level, V_theta learns high values on teacher states and
low ones on the student's, and the chi^2 moves ``log pi_p(a|s)`` of the student's own actions towards
``gamma V_theta(s') - V_theta(s)``, so actions into low-value states lose probability.

The variant: IQ-Learn's online ``method.loss=value`` (value term over expert and policy states) with
``method.regularize=True`` (chi^2 over expert and policy transitions) and the linear expert term (``phi_grad = 1``);
its batches concatenate equal expert and policy batches (``lmbda = rollout_frac = 0.5`` here, where the weighted
means are plain token means over the batch). Unlike its code: the policy rows are the newest rollout batch
(on-policy, as GKD's), not a replay of all past policy transitions; the regulariser reads the rollout's own action
where IQ-Learn resamples one at the replay state (the next state depends on the action in a token MDP); no target
network (as offline BD); the CE term on the teacher rows. ``tokenrl.theory.aliased_objectives.online_bd_loss`` is
the same objective on exact occupancies.

What the online terms can change. Over a response that ends with EOS the value term telescopes,
``sum_t V(s_t) - gamma V(s_{t+1}) = V(s_0) + (1 - gamma) sum_{t >= 1} V(s_t)`` (a truncated one adds
``-gamma V(s_T)``), so its token mean over the student's rows sees the prompt's value, and the student's later states
at weight ``1 - gamma`` (0.01) only; the student's own transitions count fully in the chi^2 term, which pulls their
implicit reward ``Q(s, a) - gamma V(s')`` towards 0 (IQ-Learn's chi^2 regulariser over the mixture).

First measurement (``python experiments/run.py algo=iql_bd_online sft_steps=500 steps=300 eval.val_every=50
threads=1 progress=false selection.sft_cache=true algo.lr=<lr> [algo.q_param=free_level]``, seed 0, the default
task and SFT start, last weights, ``experiments/report.py``):

    run                        teacher NLL (p 1.0)   KL(s||t)   on-policy KL(s||t)   mass outside the set
    SFT start                  2.085                 0.725      1.681                0.142
    kd (lr 1e-3)               1.099                 0.534      0.603                0.082
    iql_bd (lr 1e-3)           2.044                 0.690      1.307                0.135
    logits, lr 3e-4            2.083                 0.725      1.650                0.143
    logits, lr 1e-3            2.146                 0.717      1.709                0.142
    logits, lr 3e-3            2.353                 0.784      2.203                0.156
    free_level, lr 3e-4        2.063                 0.720      1.563                0.143
    free_level, lr 1e-3        2.138                 0.705      1.863                0.142
    free_level, lr 3e-3        2.317                 0.788      2.048                0.155
    free_level, 3e-4, lmbda 1  2.024                 0.719      1.515                0.142
    logits, 1e-3, frac 0.25    1.999                 0.714      1.720                0.139

One seed: at 3e-4 both forms end at or slightly better than their start, the free level ahead of the logits on teacher
NLL and both KLs; higher lrs end worse; none reaches the offline iql_bd's on-policy KL or KD. The defaults keep the fixed
offline form (``q_param=logits``, set shift, alpha 1, CE), IQ-Learn's ``lmbda = rollout_frac = 0.5`` (lmbda 1 was not
distinguishable from 0.5 at one seed), the trainer's rollout defaults (``rollout_every=10``, ``rollout_prompts=32``),
and lr 3e-4 as the centre of the benchmark's lr grid; ``algo=iql_bd_online_free`` is the free level.

Rollouts come through the trainer's hooks (:mod:`algorithms.base`): the default :meth:`Algorithm.rollout_policy`
(the student inside the teacher's top-p set, ``top_p < 1``) and :meth:`OnlineBellmanDistill.make_sampler` (the
newest rollouts and teacher data); like every rollout mix, its batches are not split, so with ``lmbda > 0`` the run
is refused under torchrun and with gradient accumulation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from algorithms.base import AlgoConfig
from algorithms.iql_bd import (
    LM_BATCH_CHOICES,
    Q_SHIFT_CHOICES,
    BDSteps,
    BDValues,
    BellmanDistill,
    bd_diagnostics,
    expert_token_reward,
    lm_terms,
    vocab_shift,
)
from algorithms.kd import kd_term_problems
from tokenrl.core.backup import chi2_penalty, shifted_q, state_values
from tokenrl.core.distributions import masked_mean, project_to_set, upcast
from tokenrl.core.options import NON_NEGATIVE, OPEN_UNIT, POSITIVE, PROBABILITY, UNIT_INTERVAL, field_problems
from tokenrl.data.buffer import Batch
from tokenrl.data.samplers import BatchSampler, RolloutMix
from tokenrl.lm.policy import CausalLMPolicy, VocabStats

Q_PARAM_CHOICES = ("logits", "free_level")


@dataclass
class OnlineBDConfig(AlgoConfig):
    """Online Bellman Distill settings; the BD options default to the fixed offline form (``algo=iql_bd``)."""

    top_p: float = 0.8  # p of the top-p MDP (teacher's nucleus); 1.0 = no restriction (full vocabulary)
    gamma: float = 0.99  # discount
    alpha: float = 1.0  # chi^2 regulariser strength (fixed offline form: 1; paper: 0.1)
    lmbda: float = 0.5  # weight of the student's own sequences in the value and chi^2 mixture (0 = offline BD)
    rollout_frac: float = 0.5  # fraction of each batch's rows from the newest rollouts when lmbda > 0 (IQ-Learn: half)
    q_param: str = "logits"  # logits: Q = logits - max (q_shift), clipped at q_min | free_level: log pi_p + V_theta(s)
    q_shift: str = "set"  # q_param=logits: subtract the max logit over: set (fixed) | vocab (paper) | vocab_detached
    q_min: float = -10.0  # q_param=logits: lower clip of Q
    ce_coef: float = 1.0  # weight of the LM term: full-vocabulary CE of the teacher tokens
    kd_coef: float = 0.0  # weight of token KD to the teacher's cached set (on the LM batch)
    lm_batch: str = "expert"  # the batch CE and KD score: expert (the batch's teacher rows) | corpus (pre-training)
    sparse: bool = True  # gather candidate rows of the output embedding (O(K)) instead of dense logits
    # Optimiser: offline BD's schedule (20 warm-up steps, cosine to 0.1). lr 3e-4 = the centre of the lr grid to sweep
    # (3e-3 ended worse than the SFT start on every metric, 1e-3 on teacher NLL and on-policy KL: module docstring).
    lr: float = 3e-4

    def problems(self) -> list[str]:
        """The optimiser's problems plus the ranges, the choices, and the options that have no meaning together."""
        ranges = {
            "top_p": PROBABILITY, "gamma": UNIT_INTERVAL, "alpha": POSITIVE.explained("the chi^2 regulariser divides by alpha"),
            "lmbda": UNIT_INTERVAL, "rollout_frac": OPEN_UNIT.explained("the expert term needs teacher rows"),
            "ce_coef": NON_NEGATIVE, "kd_coef": NON_NEGATIVE,
        }
        choices = {"q_param": Q_PARAM_CHOICES, "q_shift": Q_SHIFT_CHOICES, "lm_batch": LM_BATCH_CHOICES}
        found = super().problems() + field_problems(self, "algo", ranges, choices)
        if self.q_param == "free_level" and self.q_shift != "set":
            found.append(f"algo.q_shift={self.q_shift!r} with algo.q_param='free_level': the free level has no shift; "
                         "set algo.q_shift=set or algo.q_param=logits")
        return found + kd_term_problems(self.kd_coef, self.top_p)

    def reads_cached_sets(self) -> bool:
        """At ``top_p = 1`` every term runs over the whole vocabulary (the KD term, which reads the sets, is refused)."""
        return self.top_p < 1.0


def mixture_row_weights(is_expert_B: torch.Tensor, lmbda: float) -> torch.Tensor:
    """``[B]`` weights that make a batch's weighted token means estimate E_mix: ``(1 - lmbda) / n_teacher_rows`` on
    teacher rows, ``lmbda / n_rollout_rows`` on rollout rows (a part without rows gets nothing)."""
    n_expert = is_expert_B.sum().clamp_min(1).double()
    n_rollout = (~is_expert_B).sum().clamp_min(1).double()
    return torch.where(is_expert_B, (1.0 - lmbda) / n_expert, lmbda / n_rollout)


def weighted_token_mean(x_BT: torch.Tensor, mask_BT: torch.Tensor, weight_B: torch.Tensor) -> torch.Tensor:
    """``sum w_b x_bt / sum w_b`` over the True entries of ``mask_BT`` (0 when they weigh nothing): a token mean
    with per-row weights."""
    w_BT = weight_B.to(x_BT.dtype)[:, None] * mask_BT.to(x_BT.dtype)
    return (x_BT * w_BT).sum() / w_BT.sum().clamp_min(torch.finfo(x_BT.dtype).tiny)


def online_bd_values(
    logits_BSK: torch.Tensor,
    mask_BSK: torch.Tensor,
    steps: BDSteps,
    *,
    q_min: float,
    vocab_max_BS: torch.Tensor | None = None,
    level_BS: torch.Tensor | None = None,
) -> BDValues:
    """Q and V of a batch: shifted logits (``level_BS`` None), or the free level ``Q = log pi_p + level``.

    Args:
        logits_BSK: ``[B, S, K]`` student logits on each state's set; ``mask_BSK``: the sets.
        steps: the transitions, as for :func:`algorithms.iql_bd.bellman_distill_loss`.
        q_min: the shifted logits' lower clip.
        vocab_max_BS: ``[B, S]`` the max logit over the vocabulary (the paper's shift), None = the set's max.
        level_BS: ``[B, S]`` the value head's V_theta(s) (the free level), or None.
    """
    logits_BSK = upcast(logits_BSK)
    if level_BS is None:
        q_BSK = shifted_q(logits_BSK, mask_BSK, q_min, None if vocab_max_BS is None else upcast(vocab_max_BS))
        return steps.values(q_BSK, mask_BSK, state_values(q_BSK, mask_BSK))
    # V(s) = log sum_{A_p} exp(log pi_p + level) = level exactly; entries off the set are never read.
    level_BS = level_BS.to(logits_BSK.dtype)
    q_BSK = project_to_set(logits_BSK, mask_BSK).masked_fill(~mask_BSK, 0.0) + level_BS[..., None]
    return steps.values(q_BSK, mask_BSK, torch.where(mask_BSK.any(-1), level_BS, torch.zeros_like(level_BS)))


def online_bd_loss(
    x: BDValues, is_expert_B: torch.Tensor, *, gamma: float, alpha: float, lmbda: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``-J(Q) = -E_D[r] + E_mix[V(s) - gamma V(s')] + E_mix[r^2] / (4 alpha)`` (module docstring).

    Args:
        x: the batch's Q and V (:func:`online_bd_values`); its actions are the teacher's on teacher rows and the
            student's own on rollout rows.
        is_expert_B: ``[B]`` True on teacher rows.
        gamma, alpha: discount and chi^2 strength; lmbda: the student's weight in the mixture.

    Returns:
        ``(loss, terms)``: the scalar loss and ``loss/reward_term``, ``loss/value_term``, ``loss/chi2``, with the
        value term's two parts ``v/step_teacher``, ``v/step_rollout`` (``V(s) - gamma V(s')`` per source).
    """
    r_BT, in_set_BT = expert_token_reward(x, gamma)  # the implicit reward of each row's own action
    teacher_BT = is_expert_B[:, None] & x.action_mask_BT
    rollout_BT = ~is_expert_B[:, None] & x.action_mask_BT
    w_B = mixture_row_weights(is_expert_B, lmbda)
    step_BT = x.v_BS[:, :-1] - gamma * x.v_next_BT
    terms = {
        "loss/reward_term": masked_mean(r_BT, in_set_BT & teacher_BT),
        "loss/value_term": weighted_token_mean(step_BT, x.action_mask_BT, w_B),
        "loss/chi2": chi2_penalty(weighted_token_mean(r_BT.square(), in_set_BT, w_B), alpha),
        "v/step_teacher": masked_mean(step_BT, teacher_BT).detach(),
        "v/step_rollout": masked_mean(step_BT, rollout_BT).detach(),
    }
    return -terms["loss/reward_term"] + terms["loss/value_term"] + terms["loss/chi2"], terms


def online_bellman_distill_loss(
    cfg: OnlineBDConfig,
    logits_BSK: torch.Tensor,
    mask_BSK: torch.Tensor,
    steps: BDSteps,
    is_expert_B: torch.Tensor,
    *,
    vocab: VocabStats = VocabStats(),
    level_BS: torch.Tensor | None = None,
    teacher_logprobs_BSK: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The online BD loss of ``cfg`` plus its LM terms on the teacher rows: where the options choose.

    Args:
        cfg: the options.
        logits_BSK, mask_BSK, steps: as :func:`algorithms.iql_bd.bellman_distill_loss`.
        is_expert_B: ``[B]`` True on teacher rows, False on the student's rollouts.
        vocab: the student's full-vocabulary statistics, as for offline BD (``max_BS`` read only with
            ``q_param="logits"``, ``lse_BS`` by the KD term).
        level_BS: ``[B, S]`` the value head's output (``q_param="free_level"``).
        teacher_logprobs_BSK: as for offline BD (KD term).

    Returns:
        ``(loss, stats)``: the scalar loss and a dict of scalar tensors (namespaced keys).
    """
    if cfg.q_param == "free_level" and level_BS is None:
        raise ValueError("q_param='free_level' needs level_BS (the value head's V_theta at the batch's states)")
    x = online_bd_values(
        logits_BSK, mask_BSK, steps, q_min=cfg.q_min,
        vocab_max_BS=vocab_shift(cfg.q_shift, vocab.max_BS) if cfg.q_param == "logits" else None,
        level_BS=level_BS if cfg.q_param == "free_level" else None,
    )
    action_slot_BT, action_mask_BT = steps.action_slot_BT, steps.action_mask_BT
    loss, stats = online_bd_loss(x, is_expert_B, gamma=cfg.gamma, alpha=cfg.alpha, lmbda=cfg.lmbda)
    # Diagnostics of the teacher rows as offline BD logs them, and of the student's own rows.
    teacher_BT = is_expert_B[:, None] & action_mask_BT
    teacher_x = dataclasses.replace(x, action_slot_BT=action_slot_BT.masked_fill(~teacher_BT, -1), action_mask_BT=teacher_BT)
    r_BT, in_set_BT = expert_token_reward(teacher_x, cfg.gamma)
    rollout_BT = ~is_expert_B[:, None] & action_mask_BT
    stats = {"loss/iq": loss, **stats, **bd_diagnostics(teacher_x, r_BT, in_set_BT)}
    stats["top_p/rollout_outside_frac"] = masked_mean((action_slot_BT < 0).float(), rollout_BT)
    stats["data/student_frac"] = (~is_expert_B).float().mean()
    T = action_mask_BT.shape[1]
    for key, coef, term in lm_terms(
        upcast(logits_BSK), mask_BSK, teacher_BT, vocab, teacher_logprobs_BSK,
        ce_coef=cfg.ce_coef, mass_coef=0.0, kd_coef=cfg.kd_coef,
    ):
        loss = loss + coef * term
        stats[key] = term
    if level_BS is not None:
        stats["v/head_mean"] = masked_mean(level_BS[:, :T].detach(), action_mask_BT)
    stats["loss/total"] = loss
    return loss, stats


class OnlineBellmanDistill(BellmanDistill):
    """Online Bellman Distill: IQ-Learn's online objective with Q = student logits (or the free level) on the
    teacher's top-p MDP, on teacher data and the student's newest rollouts."""

    name = "iql_bd_online"
    config_class = OnlineBDConfig

    def __init__(self, policy: CausalLMPolicy, config: OnlineBDConfig, total_steps: int = 1000):
        config.check()
        if config.q_param == "free_level":
            policy.add_value_head()  # before the optimiser is built, so the head trains with the student
        super().__init__(policy, config, total_steps)

    @property
    def needs_rollouts(self) -> bool:
        """The student's own rollouts enter the mixture only when ``lmbda > 0`` (``lmbda = 0``: offline BD)."""
        return self.config.lmbda > 0

    @classmethod
    def make_sampler(cls, config: OnlineBDConfig) -> BatchSampler:
        """``round(rollout_frac * batch_size)`` rows of the newest rollout batch and the rest teacher data; with
        ``lmbda = 0`` offline BD's sampler (uniform over the buffer, which then holds teacher data only)."""
        return RolloutMix(config.rollout_frac) if config.lmbda > 0 else BatchSampler()

    def distillation_loss(self, cfg: OnlineBDConfig, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The online loss of ``cfg`` on the batch of teacher rows and rollouts (the corpus scored by the base)."""
        h_BSD = self.policy.state_hidden(batch)
        cq = self.policy.candidate_q(batch, cfg.top_p, sparse=cfg.sparse, h_BSD=h_BSD)
        vocab = self.policy.vocab_stats(
            h_BSD,
            batch.actions_BT if cfg.ce_coef > 0 else None,
            need_max=cfg.q_param == "logits" and cfg.q_shift != "set",
            need_lse=cfg.kd_coef > 0,
        )
        return online_bellman_distill_loss(
            cfg, cq.logits_BSK, cq.mask_BSK,
            BDSteps(cq.action_slot_BT, batch.action_mask_BT, batch.lengths_B, batch.terminated_B), batch.is_expert_B,
            vocab=vocab,
            level_BS=self.policy.value(h_BSD) if cfg.q_param == "free_level" else None,
            teacher_logprobs_BSK=None if cfg.top_p >= 1.0 else batch.cand_logprobs_BSK,
        )
