"""Exact (sampling-free) Bellman Distill on toy token MDPs, for diagnosing where the loss goes wrong.

A toy language is a teacher next-token distribution at every EOS-free prefix of length ``0 .. max_len``
(shaped like :mod:`tokenrl.tasks.synthetic`: a few tokens carry the mass, a thin uniform tail covers the rest,
some states emit EOS). The offline data are teacher samples drawn at top-p ``sample_p``; instead of
sampling, every transition ``(s, a)`` is weighted by its expected count under that data policy, normalised
to sum 1. Because the real loss is a token-weighted mean over a batch (``masked_mean``), the weighted form
below *is* the real loss in the limit of infinitely many trajectories, and equals it exactly on a batch whose
trajectories appear with integer multiplicities (tested against :func:`algorithms.iql_bd.bellman_distill_loss`).

The student is tabular: a free float64 logit vector over the whole vocabulary at every prefix,
``theta_SV``. Shape suffixes: ``S`` prefixes (states), ``V`` vocabulary.

Objectives (all return a scalar to *minimise*):

* :func:`bd_loss`: ``-J(Q)`` of Bellman Distill with the options of the real loss (math or released form,
  Q shift over the vocabulary / the set / none, the ``q_min`` clip, the LM term), plus the fix's set-mass
  term (``mass_coef``: a binary KL matching the student's mass on the teacher's set to the teacher's). A free
  per-state value scale (Q = log-softmax + v(s)) reaches exactly the Q-values of ``shift="none"``, so its
  optimum is that row's.
* :func:`solve_q`: the exact optimum of BD (+ LM term) in Q-space, where the max shift's kinks vanish.
* :func:`bc_loss` and :func:`kd_loss`: cross-entropy on the data tokens, forward KL to the teacher's set
  distribution (student normalised over the vocabulary).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from tokenrl.theory.mdps import token_prefixes
from tokenrl.core.backup import chi2_penalty, chi2_phi, shifted_q
from tokenrl.core.distributions import kl, project_to_set, restrict_to_set, soft_value
from tokenrl.core.distributions import set_mass_kl as backup_set_mass_kl
from tokenrl.theory.tabular import project_policy, top_p_support

SHIFT_CHOICES = ("vocab", "set", "none")
FORM_CHOICES = ("math", "released")


@dataclass
class ToyLanguage:
    """A teacher over the EOS-free prefixes of a small vocabulary.

    Attributes:
        teacher_SV: ``[S, V]`` teacher next-token probabilities at every prefix (states of length
            ``max_len`` are where responses truncate: they are never acted in, but their values bootstrap).
        child_SV: ``[S, V]`` long, index of ``prefix + [a]``; -1 for EOS and at prefixes of ``max_len``.
        length_S: ``[S]`` prefix lengths.
        max_len: longest response (tokens).
        eos_id: the end-of-sequence token.
    """

    teacher_SV: np.ndarray
    child_SV: np.ndarray
    length_S: np.ndarray
    max_len: int
    eos_id: int = 0

    @property
    def live_S(self) -> np.ndarray:
        """``[S]`` bool, prefixes at which a token is emitted (shorter than ``max_len``)."""
        return self.length_S < self.max_len

    @property
    def n_states(self) -> int:
        return self.teacher_SV.shape[0]

    @property
    def vocab_size(self) -> int:
        return self.teacher_SV.shape[1]


def make_toy_language(
    vocab_size: int = 6,
    max_len: int = 4,
    seed: int = 0,
    mean_support: float = 3.0,
    concentration: float = 0.5,
    smoothing: float = 0.03,
    eos_states: float = 0.7,
    eos_prob: float = 0.5,
) -> ToyLanguage:
    """A tiny version of the synthetic language: sparse Dirichlet rows plus a thin uniform tail.

    Each prefix draws ``k = min(V - 1, 1 + Poisson(mean_support - 1))`` non-EOS tokens carrying
    ``Dirichlet(concentration)`` weights; a fraction ``eos_states`` of the non-empty prefixes also put
    ``eos_prob`` on EOS; ``smoothing`` is spread uniformly over the vocabulary (the thin tail that makes every
    token possible, as in :class:`tokenrl.tasks.synthetic.SyntheticLanguage`). As there, the first token is
    uniform over a few "topic" tokens (here 3), so the data visit many prefixes.

    Args:
        vocab_size: tokens including EOS (id 0).
        max_len: longest response; prefixes of this length truncate.
        seed: seed of the tables.
        mean_support, concentration, smoothing, eos_states, eos_prob: see above.
    """
    rng = np.random.default_rng(seed)
    prefixes = token_prefixes(vocab_size, max_len)
    index = {prefix: i for i, prefix in enumerate(prefixes)}
    V = vocab_size
    teacher = np.zeros((len(prefixes), V))
    child = np.full((len(prefixes), V), -1, dtype=np.int64)
    for s, prefix in enumerate(prefixes):
        row = np.zeros(V)
        if len(prefix) == 0:
            row[1 : min(4, V)] = 1.0 / (min(4, V) - 1)
        else:
            k = int(min(V - 1, 1 + rng.poisson(max(mean_support - 1.0, 0.0))))
            row[rng.choice(np.arange(1, V), size=k, replace=False)] = rng.dirichlet(np.full(k, concentration))
        if len(prefix) > 0 and rng.random() < eos_states:
            row = (1.0 - eos_prob) * row
            row[0] += eos_prob
        teacher[s] = (1.0 - smoothing) * row + smoothing / V
        if len(prefix) < max_len:
            for a in range(1, V):
                child[s, a] = index[prefix + (a,)]
    teacher /= teacher.sum(1, keepdims=True)
    length = np.array([len(p) for p in prefixes])
    return ToyLanguage(teacher, child, length, max_len)


def action_sets(lang: ToyLanguage, p: float) -> np.ndarray:
    """``[S, V]`` bool, the teacher's top-p set at every prefix; ``p = 1`` is the whole vocabulary (as the real
    loss's ``candidate_q`` does)."""
    if p >= 1.0:
        return np.ones_like(lang.teacher_SV, dtype=bool)
    return top_p_support(lang.teacher_SV, p)


def data_policy(lang: ToyLanguage, sample_p: float) -> np.ndarray:
    """``[S, V]`` the data's sampling policy: the teacher projected on its top-``sample_p`` set."""
    return project_policy(lang.teacher_SV, action_sets(lang, sample_p))


def reach_probs(lang: ToyLanguage, policy_SV: np.ndarray) -> np.ndarray:
    """``[S]`` probability that a response reaches each prefix under ``policy_SV`` (1 at the empty prefix)."""
    reach = np.zeros(lang.n_states)
    reach[0] = 1.0
    for s in np.argsort(lang.length_S, kind="stable"):  # parents before children
        kids = lang.child_SV[s] >= 0
        reach[lang.child_SV[s, kids]] += reach[s] * policy_SV[s, kids]
    return reach


def transition_weights(lang: ToyLanguage, sample_p: float) -> np.ndarray:
    """``[S, V]`` expected count of each transition ``(s, a)`` in the data, normalised to sum 1.

    This is the weight a transition gets in a token-weighted mean over infinitely many data trajectories.
    """
    pi = data_policy(lang, sample_p)
    w = reach_probs(lang, pi)[:, None] * pi * lang.live_S[:, None]
    return w / w.sum()


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
    """

    lang: ToyLanguage
    w_SV: torch.Tensor
    sample_p: float = 0.8
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
    return Problem(sub, torch.as_tensor(w[keep], dtype=torch.float64), sample_p)


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


def solve_q(
    prob: Problem, opts: BDOptions, q0_SV: torch.Tensor, forced_out_S: torch.Tensor | None = None
) -> tuple[float, torch.Tensor, float]:
    """The optimum of BD (with its LM term, no fix term) over the Q-values the shift can produce, from ``q0_SV``.

    BD reads only the Q-values on the sets, so it is solved in Q-space, where the logit-space kinks of the
    max (ties) disappear:

    * ``shift="vocab"`` with a token outside every set (p < 1): the reachable Q on a set is exactly the box
      ``[q_min, 0]^|A_p(s)|`` (all entries < 0 means an outside token holds the max);
    * ``shift="set"`` (and ``"vocab"`` at p = 1, where the set is the vocabulary): the same box with the
      set's largest entry pinned at 0 (which entry: the start's largest, then the first solution's);
    * ``shift="none"``: raw logits, ``[q_min, Q_CAP]`` (a solution at the cap flags an unbounded objective).

    With ``ce_coef > 0`` the LM term is :func:`projected_ce` (only for the data's set, ``p = sample_p``):
    under the set shift the outside logits only enter the LM term, which sends them to ``-inf``; under the
    vocabulary shift the states in ``forced_out_S`` keep an outside token at the max (0) and the others pin
    the set's max at 0. L-BFGS-B solves each box problem to a projected-gradient tolerance (returned).

    Returns:
        ``(loss, q_SV, projected_grad_norm)``.
    """
    from scipy.optimize import minimize

    if opts.mass_coef:
        raise ValueError("solve_q solves BD (+ LM term) only: its optimum with the set-mass term is completion()'s")
    set_SV = prob.set_mask(opts.p)
    if opts.ce_coef and opts.p != prob.sample_p:
        raise ValueError("solve_q's LM term needs the loss's sets to be the data's (p == sample_p)")
    lo = -50.0 if opts.q_min is None else opts.q_min
    hi = Q_CAP if opts.shift == "none" else 0.0
    lo_SV = torch.full(set_SV.shape, lo, dtype=torch.float64)
    hi_SV = torch.full(set_SV.shape, hi, dtype=torch.float64)

    def loss_of(q):
        loss = bd_loss_from_q(q, prob, opts)
        if opts.ce_coef:
            loss = loss + opts.ce_coef * projected_ce(q, prob, set_SV, forced_out_S)
        return loss

    def run(lo_SV, hi_SV, x0):
        def f(x):
            q = torch.tensor(x, dtype=torch.float64).view(set_SV.shape).requires_grad_(True)
            loss = loss_of(q)
            loss.backward()
            return float(loss.detach()), q.grad.numpy().ravel().copy()

        bounds = list(zip(lo_SV.numpy().ravel(), hi_SV.numpy().ravel()))
        x0 = np.clip(x0.numpy().ravel(), lo_SV.numpy().ravel(), hi_SV.numpy().ravel())
        res = minimize(f, x0, jac=True, method="L-BFGS-B", bounds=bounds,
                       options={"maxiter": 20000, "maxfun": 40000, "ftol": 1e-13, "gtol": 1e-9})
        x = torch.tensor(res.x, dtype=torch.float64).view(set_SV.shape)
        _, g = f(res.x)
        g = torch.tensor(g).view(set_SV.shape)
        # projected gradient: components pushing against an active bound do not count
        pg = torch.where(((x <= lo_SV) & (g > 0)) | ((x >= hi_SV) & (g < 0)), torch.zeros_like(g), g)
        return float(res.fun), x, float(pg.norm())

    q0 = q0_SV.clamp(lo, hi)
    has_out = ~set_SV.all(-1)
    if opts.shift == "none":
        return run(lo_SV, hi_SV, q0)
    free_S = has_out if opts.shift == "vocab" else torch.zeros_like(has_out)
    if opts.ce_coef:
        free_S = free_S & (forced_out_S if forced_out_S is not None else torch.zeros_like(has_out))
    # Pin the set's max at 0 where the max must lie in the set: at the start's largest entry, then re-pinned
    # at the first solution's.
    for _ in range(2):
        top = restrict_to_set(q0, set_SV).argmax(-1, keepdim=True)
        lo_pin = torch.where(free_S[:, None], lo_SV, lo_SV.scatter(-1, top, 0.0))
        loss, q, pg = run(lo_pin, hi_SV, q0)
        if bool(free_S.all()):
            break
        q0 = q
    return loss, q, pg


# Upper bound on raw-logit Q-values in :func:`solve_q`; an optimum at it means the objective is unbounded.
Q_CAP = 50.0


def completion(q_SV: torch.Tensor, prob: Problem, opts: BDOptions, outside_mass: str | None = None) -> torch.Tensor:
    """Logits of the student with the *least* mass outside the set that realise ``q_SV`` on the sets.

    Pure BD does not see tokens outside the set except through the vocabulary max, so its optimum fixes the
    logits on the set only. The completion puts every outside token at ``-inf``, except that under the
    vocabulary-max shift a state whose set Q-values are all < 0 needs one outside token at the max (0).
    With ``outside_mass="teacher"`` (the set-mass fix, whose term sets it exactly) the outside tokens share
    the teacher's outside mass uniformly instead.
    """
    set_SV = prob.set_mask(opts.p)
    theta = restrict_to_set(q_SV, set_SV)
    if outside_mass is not None:
        # the set-mass fix: the teacher's outside mass, spread uniformly over the outside tokens
        m_t = (prob.teacher_SV * set_SV).sum(-1)
        log_in = soft_value(theta)
        n_out = (~set_SV).sum(-1).clamp_min(1)
        fill = log_in + torch.log((1 - m_t).clamp_min(1e-300) / m_t) - torch.log(n_out.to(theta.dtype))
        theta = torch.where(set_SV, theta, fill[:, None])
    elif opts.shift == "vocab":
        forced = theta.amax(-1) < -1e-9
        first_out = (~set_SV).to(torch.int64).argmax(-1)
        theta[forced, first_out[forced]] = 0.0
    return theta


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


def minimise(loss_fn, params: list[torch.Tensor], max_iter: int = 3000) -> float:
    """Minimise ``loss_fn()`` over ``params`` with L-BFGS (strong Wolfe), float64; returns the final gradient
    norm (non-smooth points of the max shift and the clip can stop L-BFGS early: the norm tells)."""
    opt = torch.optim.LBFGS(
        params,
        lr=1.0,
        max_iter=max_iter,
        max_eval=2 * max_iter,
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    opt.step(closure)
    opt.zero_grad()
    loss_fn().backward()
    norm = torch.sqrt(sum((p.grad**2).sum() for p in params))
    return float(norm)


@dataclass
class Fit:
    """The result of one logit-space training run."""

    theta_SV: torch.Tensor
    loss: float
    grad_norm: float


def fit(prob: Problem, objective: str, opts: BDOptions | None, start: str, max_iter: int = 3000) -> Fit:
    """Train the tabular student's logits on ``objective`` (``"bd"``, ``"bc"`` or ``"kd"``) from ``start``
    (``"sft"``: :func:`sft_start`, ``"uniform"``: zero logits). For BD prefer :func:`solve_q`: in logit space
    L-BFGS stalls at ties of the max."""
    if start == "sft":
        theta = sft_start(prob).clone()
    elif start == "uniform":
        theta = torch.zeros(prob.lang.n_states, prob.lang.vocab_size, dtype=torch.float64)
    else:
        raise ValueError(f"start must be 'sft' or 'uniform', got {start!r}")
    theta.requires_grad_(True)
    if objective == "bd":
        if opts is None:
            raise ValueError("objective 'bd' needs opts")
        loss_fn = lambda: bd_loss(theta, prob, opts)  # noqa: E731
    elif objective == "bc":
        loss_fn = lambda: bc_loss(theta, prob)  # noqa: E731
    elif objective == "kd":
        loss_fn = lambda: kd_loss(theta, prob)  # noqa: E731
    else:
        raise ValueError(f"objective must be 'bd', 'bc' or 'kd', got {objective!r}")
    gnorm = minimise(loss_fn, [theta], max_iter)
    with torch.no_grad():
        final = float(loss_fn())
    return Fit(theta.detach(), final, gnorm)


def out_mass_slope(theta_SV: torch.Tensor, prob: Problem, opts: BDOptions) -> tuple[float, float]:
    """Direction in which a gradient step on the BD loss moves the out-of-set mass, at ``theta_SV``.

    Returns ``(d out_mass / d step, |grad on out-of-set logits|)``: the first is the derivative of the
    data-weighted out-of-set mass along the negative loss gradient (positive = BD pushes mass out of the set).
    """
    theta = theta_SV.clone().requires_grad_(True)
    (g_theta,) = torch.autograd.grad(bd_loss(theta, prob, opts), [theta])
    set_SV = prob.set_mask(prob.sample_p)
    theta2 = theta_SV.clone().requires_grad_(True)
    out = (state_weights(prob) * (torch.softmax(theta2, -1) * ~set_SV).sum(-1)).sum()
    (g_out,) = torch.autograd.grad(out, [theta2])
    return float(-(g_out * g_theta).sum()), float(g_theta[~set_SV].norm())
