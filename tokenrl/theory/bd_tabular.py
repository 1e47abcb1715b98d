"""Exact (sampling-free) Bellman Distill on toy token MDPs, for diagnosing where the loss goes wrong.

The toy languages and their data weights are :mod:`tokenrl.theory.toy_language`'s; the solvers are
:mod:`tokenrl.theory.bd_solvers`'. Because the real loss is a token-weighted mean over a batch (``masked_mean``),
the weighted form below *is* the real loss in the limit of infinitely many trajectories, and equals it exactly on
a batch whose trajectories appear with integer multiplicities (tested against
:func:`algorithms.iql_bd.bellman_distill_loss`).

The student is tabular: a free float64 logit vector over the whole vocabulary at every prefix,
``theta_SV``. Shape suffixes: ``S`` prefixes (states), ``V`` vocabulary.

Objectives (all return a scalar to *minimise*):

* :func:`bd_loss`: ``-J(Q)`` of Bellman Distill with the options of the real loss (math or released form,
  Q shift over the vocabulary / the set / none, the ``q_min`` clip, the LM term), plus the fix's set-mass
  term (``mass_coef``: a binary KL matching the student's mass on the teacher's set to the teacher's). A free
  per-state value scale (Q = log-softmax + v(s)) reaches exactly the Q-values of ``shift="none"``, so its
  optimum is that row's.
* :func:`tokenrl.theory.bd_solvers.solve_q`: the exact optimum of BD (+ LM term) in Q-space, where the max
  shift's kinks vanish.
* :func:`bc_loss` and :func:`kd_loss`: cross-entropy on the data tokens, forward KL to the teacher's set
  distribution (student normalised over the vocabulary).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from tokenrl.core.backup import chi2_penalty, chi2_phi, shifted_q
from tokenrl.core.distributions import kl, project_to_set, soft_value
from tokenrl.core.distributions import set_mass_kl as backup_set_mass_kl
from tokenrl.theory.toy_language import ToyLanguage, action_sets, data_policy, transition_weights

SHIFT_CHOICES = ("vocab", "set", "none")
FORM_CHOICES = ("math", "released")


@dataclass
class BDOptions:
    """One Bellman Distill variant (the fields mirror :class:`algorithms.iql_bd.IQLBDConfig`).

    Attributes:
        p: top-p of the loss's MDP (1.0 = whole vocabulary).
        form: ``"math"`` (phi at the expert token) or ``"released"`` (vocabulary-mean expert term and
            chi^2 over the vocabulary).
        shift: Q = logits minus the max over ``"vocab"`` | ``"set"``, or ``"none"`` (raw logits).
        q_min: lower clip of Q, or None.
        ce_coef: weight of the LM term (cross-entropy on the data tokens).
        vocab_size: |V| the released form divides by (None: the toy's vocabulary).
        mass_coef: fix candidate, weight of ``KL(Bern(M_teacher) || Bern(m_student))`` on the set's mass.
        gamma, alpha: discount and chi^2 strength.
    """

    p: float = 0.8
    form: str = "math"
    shift: str = "vocab"
    q_min: float | None = -10.0
    ce_coef: float = 0.0
    vocab_size: int | None = None
    mass_coef: float = 0.0
    gamma: float = 0.99
    alpha: float = 0.1

    def __post_init__(self) -> None:
        if self.form not in FORM_CHOICES:
            raise ValueError(f"form must be one of {FORM_CHOICES}, got {self.form!r}")
        if self.shift not in SHIFT_CHOICES:
            raise ValueError(f"shift must be one of {SHIFT_CHOICES}, got {self.shift!r}")


@dataclass
class Problem:
    """Everything the exact objectives need, as float64 tensors.

    Attributes:
        lang: the toy language.
        w_SV: ``[S, V]`` transition weights (sum 1).
        sample_p: top-p of the data (the teacher's "set" of the metrics and of KD).
        state_ids: ``[S]`` index of each state in the language :func:`make_problem` restricted (None: not
            restricted).
    """

    lang: ToyLanguage
    w_SV: torch.Tensor
    sample_p: float = 0.8
    state_ids: np.ndarray | None = None
    _sets: dict = field(default_factory=dict, repr=False)

    def set_mask(self, p: float) -> torch.Tensor:
        if p not in self._sets:
            self._sets[p] = torch.from_numpy(action_sets(self.lang, p))
        return self._sets[p]

    @property
    def child_SV(self) -> torch.Tensor:
        return torch.from_numpy(self.lang.child_SV)

    @property
    def teacher_SV(self) -> torch.Tensor:
        return torch.from_numpy(self.lang.teacher_SV)


def make_problem(lang: ToyLanguage, sample_p: float = 0.8, w_SV: np.ndarray | None = None) -> Problem:
    """The exact problem of ``lang`` (weights from :func:`transition_weights` unless given), restricted to the
    prefixes the data visit or bootstrap from (the others never enter any loss or metric)."""
    w = transition_weights(lang, sample_p) if w_SV is None else w_SV / w_SV.sum()
    used = w.sum(-1) > 0
    kids = lang.child_SV[(w > 0) & (lang.child_SV >= 0)]
    keep = used.copy()
    keep[kids] = True
    new_index = np.cumsum(keep) - 1
    child = np.where((w > 0) & (lang.child_SV >= 0), new_index[lang.child_SV.clip(0)], -1)[keep]
    sub = ToyLanguage(lang.teacher_SV[keep], child, lang.length_S[keep], lang.max_len, lang.eos_id)
    return Problem(sub, torch.as_tensor(w[keep], dtype=torch.float64), sample_p, np.flatnonzero(keep))


def _wmean(x_SV: torch.Tensor, w_SV: torch.Tensor) -> torch.Tensor:
    return (x_SV * w_SV).sum() / w_SV.sum().clamp_min(1e-300)


def q_values(theta_SV: torch.Tensor, set_SV: torch.Tensor, opts: BDOptions) -> torch.Tensor:
    """``[S, V]`` Q-values of the student (only entries in ``set_SV`` are ever read)."""
    shift_S = {"vocab": theta_SV.amax(-1), "set": None, "none": theta_SV.new_zeros(theta_SV.shape[0])}[opts.shift]
    return shifted_q(theta_SV, set_SV, opts.q_min, shift_S)


def soft_values(q_SV: torch.Tensor, set_SV: torch.Tensor) -> torch.Tensor:
    """``[S]`` V_p(s) = log sum_{a in A_p(s)} exp Q(s, a)."""
    return soft_value(q_SV, set_SV)


def next_values(v_S: torch.Tensor, child_SV: torch.Tensor) -> torch.Tensor:
    """``[S, V]`` V(s') of every transition: 0 after EOS (terminated), bootstrapped at truncated prefixes."""
    return torch.where(child_SV >= 0, v_S[child_SV.clamp_min(0)], torch.zeros((), dtype=v_S.dtype))


def set_mass_kl(theta_SV: torch.Tensor, set_SV: torch.Tensor, teacher_SV: torch.Tensor) -> torch.Tensor:
    """``[S]`` KL(Bern(M_t) || Bern(m_s)) between the teacher's and the student's mass on the set (the real
    loss's :func:`tokenrl.core.distributions.set_mass_kl` with the states as the batch)."""
    return backup_set_mass_kl(theta_SV, set_SV, soft_value(theta_SV), torch.log(teacher_SV))


def bd_loss(theta_SV: torch.Tensor, prob: Problem, opts: BDOptions) -> torch.Tensor:
    """Exact ``-J(Q)`` (+ LM and fix terms), the data-weighted form of the real BD loss.

    Args:
        theta_SV: ``[S, V]`` student logits.
        prob: the problem (transition weights, sets).
        opts: the variant.
    """
    set_SV = prob.set_mask(opts.p)
    loss = bd_loss_from_q(q_values(theta_SV, set_SV, opts), prob, opts)
    if opts.ce_coef > 0:
        loss = loss + opts.ce_coef * bc_loss(theta_SV, prob)
    if opts.mass_coef > 0:
        loss = loss + opts.mass_coef * _wmean(set_mass_kl(theta_SV, set_SV, prob.teacher_SV)[:, None], prob.w_SV)
    return loss


def bd_loss_from_q(q_SV: torch.Tensor, prob: Problem, opts: BDOptions) -> torch.Tensor:
    """``-J(Q)`` as a function of the Q-values themselves (entries outside the loss's sets are ignored)."""
    set_SV = prob.set_mask(opts.p)
    q = q_SV
    v = soft_values(q, set_SV)
    v_next = next_values(v, prob.child_SV)
    w = prob.w_SV
    g, alpha = opts.gamma, opts.alpha
    r = q - g * v_next
    value_term = _wmean(v[:, None] - g * v_next, w)
    if opts.form == "math":
        w_in = w * set_SV  # an expert token outside A_p(s) has no Q: its phi term is dropped
        objective = _wmean(chi2_phi(r, alpha), w_in) - value_term
    else:
        V = opts.vocab_size or q.shape[1]
        q_in = q.masked_fill(~set_SV, 0.0)
        r_mean = q_in.sum(-1, keepdim=True) / V - g * v_next
        set_size = set_SV.sum(-1, keepdim=True).to(q.dtype)
        # the square runs over every token k of the expert's state, bootstrapped from the expert's next state
        r_all = q[:, None, :] - g * v_next[:, :, None]  # [S, V (expert action), V (token k)]
        in_set_sq = (r_all.square() * set_SV[:, None, :]).sum(-1)
        sq = (in_set_sq + (V - set_size) * (g * v_next).square()) / V
        objective = _wmean(r_mean, w) - chi2_penalty(_wmean(sq, w), alpha) - value_term
    return -objective


def projected_ce(q_SV: torch.Tensor, prob: Problem, set_SV: torch.Tensor, extra_S: torch.Tensor | None = None):
    """Cross-entropy of the data tokens under ``softmax(Q)`` over the set (plus ``exp(0)`` per state where
    ``extra_S``: an outside token held at the max), i.e. the LM term once every other outside logit is at
    ``-inf``, where the LM term alone puts it."""
    z, mask = q_SV, set_SV
    if extra_S is not None:
        z = torch.cat([z, z.new_zeros(z.shape[0], 1)], -1)
        mask = torch.cat([mask, extra_S[:, None]], -1)
    lse = soft_value(z, mask)[:, None]
    nll = torch.where(set_SV, lse - q_SV, torch.zeros_like(q_SV))
    return _wmean(nll, prob.w_SV * set_SV)


def bc_loss(theta_SV: torch.Tensor, prob: Problem) -> torch.Tensor:
    """Cross-entropy of the data tokens (full-vocabulary softmax), data-weighted."""
    return _wmean(-project_to_set(theta_SV), prob.w_SV)


def kd_loss(theta_SV: torch.Tensor, prob: Problem) -> torch.Tensor:
    """Forward KL from the teacher's top-``sample_p`` set distribution to the student (normalised over V)."""
    set_SV = prob.set_mask(prob.sample_p)
    kl_S = kl(project_to_set(torch.log(prob.teacher_SV), set_SV), project_to_set(theta_SV), set_SV)
    return _wmean(kl_S[:, None], prob.w_SV)


def state_weights(prob: Problem) -> torch.Tensor:
    """``[S]`` data occupancy of the prefixes where tokens are emitted (sums to 1)."""
    return prob.w_SV.sum(-1)


def sft_start(prob: Problem, outside_mass: float = 0.05) -> torch.Tensor:
    """Logits of the SFT/BC optimum (the data policy), with ``outside_mass`` spread uniformly outside the set.

    The exact BC optimum puts no mass outside the data's set (logits ``-inf``); a small finite amount keeps
    logits finite and stands for what a finite SFT run leaves there.
    """
    set_SV = prob.set_mask(prob.sample_p)
    data = torch.from_numpy(data_policy(prob.lang, prob.sample_p))
    n_out = (~set_SV).sum(-1, keepdim=True).clamp_min(1)
    has_out = (~set_SV).any(-1, keepdim=True)
    mix = torch.where(set_SV, data * torch.where(has_out, 1.0 - outside_mass, 1.0), outside_mass / n_out)
    return torch.log(mix)


def metrics(
    theta_SV: torch.Tensor, prob: Problem, opts: BDOptions | None = None, q_SV: torch.Tensor | None = None
) -> dict[str, float]:
    """The student's distance to the teacher, data-weighted over the prefixes where tokens are emitted.

    ``out_mass``: mass outside the teacher's top-``sample_p`` set; ``argmax_out``: fraction of states whose
    argmax lies outside it; ``kl_ts``/``kl_ts_set``/``kl_st``: KL(teacher||student) over the vocabulary and
    between the two renormalised on the set (the loss's set when it is smaller), KL(student||teacher). With ``opts``, BD's implicit reward
    ``r = Q(s, a) - gamma V_p(s')`` (mean over in-set data transitions), the mean of V_p and the fraction of
    states with V_p < 0 (from ``q_SV`` when given, else from the logits).
    """
    with torch.no_grad():
        d = state_weights(prob)
        set_SV = prob.set_mask(prob.sample_p)
        logs = project_to_set(theta_SV)
        s = logs.exp()
        t = prob.teacher_SV
        logt = torch.log(t)
        out = (s * ~set_SV).sum(-1)
        argmax_out = (~set_SV).gather(-1, theta_SV.argmax(-1, keepdim=True))[:, 0].to(t.dtype)
        kl_ts = kl(logt, logs)
        kl_st = kl(logs, logt)
        # on the smaller of the data's and the loss's sets: tokens outside the loss's set are not seen by it
        kset_SV = set_SV if opts is None or opts.p >= prob.sample_p else prob.set_mask(opts.p)
        kl_set = kl(project_to_set(logt, kset_SV), project_to_set(logs, kset_SV), kset_SV)
        ent = -torch.where(s > 0, s * logs, torch.zeros_like(s)).sum(-1)
        live = d > 0
        res = {
            "out_mass": float((d * out).sum()),
            "argmax_out": float((d * argmax_out).sum()),
            "kl_ts": float((d * kl_ts)[live].sum()),
            "kl_ts_set": float((d * kl_set).sum()),
            "kl_st": float((d * kl_st).sum()),
            "entropy": float((d * ent).sum()),
        }
        if opts is not None:
            lset = prob.set_mask(opts.p)
            q = q_values(theta_SV, lset, opts) if q_SV is None else q_SV
            v = soft_values(q, lset)
            r = q - opts.gamma * next_values(v, prob.child_SV)
            res["r_mean"] = float(_wmean(r, prob.w_SV * lset))
            res["v_mean"] = float((d * v).sum())
            res["v_neg"] = float((d * (v < 0).to(t.dtype)).sum())
        return res
