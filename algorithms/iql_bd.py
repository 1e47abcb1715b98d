"""Bellman Distill (BD): Inverse soft-Q Learning (IQ-Learn, Garg et al. 2021) on the teacher's top-p MDP.

Registered as ``iql_bd`` (the fixed variant, the default); the presets ``algo=iql_bd_math`` (the paper's math
form: vocabulary shift, alpha 0.1) and ``algo=iql_bd_released`` (the released code's form: vocabulary shift,
released value, vocabulary-mean expert term, square over the vocabulary, EOS masked, 0.5 CE + 0.5 KD) are
YAMLs in ``experiments/conf/algo/`` that set the options below, as is the matched-information arm ``algo=bd_kd``
(BD + KD: the fixed variant with token KD to the teacher's cached set on the distillation batch instead of CE,
next to ``kd_pbc`` in :mod:`algorithms.kd`, the same information without the TD terms).

Yu, Li & Zhang, "Language Model Distillation: A Temporal Difference Imitation Learning Perspective"
(arXiv 2505.20335). "IQL" is *Inverse soft-Q Learning*, not Implicit Q-Learning: one network, no expectile,
no target network. With Q(s, .) = the student's logits (shifted by a max, clipped below at ``q_min``),
A_p(s) = the teacher's top-p set and V_p(s) = log sum_{a in A_p(s)} exp Q(s, a) (0 after EOS), BD maximises
over expert transitions (s, a, s') of the offline data D:

    J(Q) = E_D[ phi( Q(s, a) - gamma V_p(s') ) ] - E_D[ V_p(s) - gamma V_p(s') ],
    phi(x) = x - x^2 / (4 alpha)                                   (chi^2 regulariser)

The student policy is softmax(Q) projected onto A_p(s). The TD part reads only logits inside A_p(s), so with
the sparse head its memory is O(|A_p|) per position; whatever needs the whole vocabulary (the paper's max
shift, the set-mass term, the LM terms) comes from ONE chunked pass (:meth:`CausalLMPolicy.vocab_stats`).
An expert action outside A_p(s) has no Q in the top-p MDP: its phi term is dropped and counted in
``top_p/expert_outside_frac``. ``top_p = 1`` is the full-vocabulary IQ-Learn (no restriction).

Which variant is the default, and why (docs/bd_diagnosis.md): the paper shifts Q by the max logit over the
*vocabulary*, which pins the value level (Q <= 0, V_p >= 0 while the argmax is in the set); the chi^2 penalty
wants V_p(s') ~ Q(s, a) / gamma <= 0, reachable only by putting a token *outside* the set at the max, so the
exact optimum moves mass out of the teacher's set and ``algo=iql_bd_math`` ends worse than its SFT start. The
default ``iql_bd`` shifts by the max over the set (``q_shift="set"``: no such incentive, a purely O(K) TD part),
keeps the CE term (under the set shift the only thing holding the outside mass down) and uses ``alpha=1`` (the
penalty's in-set bias shrinks as 1/alpha); the set-mass term (``mass_coef``, tabularly exact) hurts with a
network: it fixes the outside mass's total, not where it goes.

The file reads as the loss is built (TRL's ``generalized_jsd_loss`` style: pure functions of tensors, the
formulas shared from :mod:`tokenrl.core.backup` and :mod:`tokenrl.core.distributions`);
:func:`bellman_distill_loss` is the one place the options of :class:`BellmanDistillConfig` choose among them:
the batch (``mask_eos``: :func:`drop_eos_steps`), Q (``q_shift``) and V (``value``: the log-sum-exp over the
set, or the released projection's entropy-regularised expectation) in :class:`BDValues`; the expert term
(``expert_term``: :func:`expert_token_reward` at the expert token, or the release's :func:`vocab_mean_reward`);
the form, i.e. where phi's square applies (``chi2_on``: :func:`math_form_loss` at the expert token, the paper's
and the default's; :func:`expert_and_policy_loss`, IQ-Learn's stable variant averaging the square over the
expert action and the student's own a' ~ pi_p(.|s); :func:`released_form_loss`, the release's square over the
whole vocabulary of the masked Q); the LM terms (:func:`lm_terms`: ``ce_coef``, ``mass_coef``, ``kd_coef``).
``lm_batch`` names the batch CE and KD score: ``"expert"`` (the distillation batch: BD + BC; ``iql_bd``'s, since
that CE holds its outside-set mass down) or ``"corpus"`` (a batch of the task's pre-training corpus, scored by
:func:`algorithms.kd.lm_batch_loss`: the paper's and the release's ``pt_loss(lm_batch)``; ``iql_bd_math``'s and
``iql_bd_released``'s). Still unlike the paper: its LM term is CE + token KD (weights unpublished), ours CE
alone; the release's KD reads the full teacher on OpenWebText, ours the cached set on the task's corpus; its
optimiser (lr 5e-6, warm-up then cosine, no clipping, pretrained students) is not this task's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from algorithms.base import AlgoConfig, Algorithm, float_stats
from algorithms.kd import kd_term_problems, lm_batch_loss
from tokenrl.core.backup import (
    chi2_penalty,
    chi2_phi,
    eos_steps,
    gather_action,
    implicit_reward,
    iq_learn_value_term,
    next_state_values,
    released_state_values,
    shifted_q,
    state_values,
)
from tokenrl.core.distributions import kl, masked_mean, project_to_set, set_mass_kl, soft_value, upcast
from tokenrl.core.options import NON_NEGATIVE, POSITIVE, PROBABILITY, UNIT_INTERVAL, field_problems
from tokenrl.data.buffer import Batch, require_lm_batch
from tokenrl.lm.policy import VocabStats

Q_SHIFT_CHOICES = ("set", "vocab", "vocab_detached")
VALUE_CHOICES = ("soft", "released")
EXPERT_TERM_CHOICES = ("math", "vocab_mean")
CHI2_CHOICES = ("expert", "expert_and_policy", "vocab")
LM_BATCH_CHOICES = ("expert", "corpus")


@dataclass
class BellmanDistillConfig(AlgoConfig):
    """Bellman Distill (inverse soft-Q learning) settings; the defaults are the fixed variant (``algo=iql_bd``).

    Presets (``experiments/conf/algo/``): ``iql_bd_math`` (the paper's math form: alpha 0.1, vocabulary shift, LM
    term on the corpus), ``iql_bd_released`` (the released code's form), ``bd_kd`` (BD + KD, no CE). Paper: gamma
    0.99, p 0.8, alpha 0.1, q_min -10.
    """

    top_p: float = 0.8  # p of the top-p MDP (teacher's nucleus); 1.0 = no restriction (full vocabulary)
    gamma: float = 0.99  # discount
    alpha: float = 1.0  # chi^2 regulariser strength: phi(x) = x - x^2 / (4 alpha) (paper: 0.1)
    q_min: float = -10.0  # Q = logits - max logit, clipped below at q_min
    q_shift: str = "set"  # subtract the max logit over: set (fixed) | vocab (paper) | vocab_detached (no grad)
    chi2_on: str = "expert"  # where phi's square applies: expert | expert_and_policy | vocab (released code)
    expert_term: str = "math"  # math: Q(s, a_expert); vocab_mean: released code's masked-Q vocabulary mean
    value: str = "soft"  # V_p: soft (log-sum-exp over the set) | released (entropy-regularised, smoothed projection)
    epsilon: float = 1e-8  # value=released: the projection's additive smoothing (0 gives NaN; unpublished)
    released_vocab_size: int = 0  # |V| the released-code terms divide by (release: 151936); 0 = the model's
    mask_eos: bool = False  # drop the EOS step from the BD terms, as the release (EOS = pad) does
    mass_coef: float = 0.0  # weight of KL(Bern(teacher's set mass) || Bern(student's set mass))
    ce_coef: float = 1.0  # weight of the LM term: full-vocabulary CE on the expert tokens (paper: weight unpublished)
    kd_coef: float = 0.0  # weight of token KD to the teacher's cached set (the release's LM term: 0.5 CE + 0.5 KD)
    lm_batch: str = "expert"  # the batch CE and KD score: expert (the distillation batch) | corpus (pre-training)
    sparse: bool = True  # gather candidate rows of the output embedding (O(K)) instead of dense logits

    def problems(self) -> list[str]:
        """The optimiser's problems plus BD's ranges, its four string options and the KD term's need of a set."""
        ranges = {
            "top_p": PROBABILITY, "gamma": UNIT_INTERVAL, "alpha": POSITIVE.explained("the chi^2 regulariser divides by alpha"),
            "released_vocab_size": NON_NEGATIVE.explained("0 = the model's"), "mass_coef": NON_NEGATIVE,
            "ce_coef": NON_NEGATIVE, "kd_coef": NON_NEGATIVE,
        }
        choices = {"q_shift": Q_SHIFT_CHOICES, "chi2_on": CHI2_CHOICES, "expert_term": EXPERT_TERM_CHOICES,
                   "value": VALUE_CHOICES, "lm_batch": LM_BATCH_CHOICES}
        found = super().problems() + field_problems(self, "algo", ranges, choices)
        if self.value == "released" and not self.epsilon > 0:
            found.append(f"algo.epsilon={self.epsilon!r} with algo.value='released': the released projection needs "
                         "epsilon > 0 (0 gives 0 * log 0 = NaN); set algo.epsilon=1e-8")
        return found + kd_term_problems(self.kd_coef, self.top_p)

    def reads_cached_sets(self) -> bool:
        """At ``top_p = 1`` the BD terms take dense logits over the whole vocabulary, not the cached sets (the KD
        term, which reads them, is refused there by the run validation)."""
        return self.top_p < 1.0


@dataclass
class BDValues:
    """One batch's Q and V on the top-p MDP: what the expert terms and the forms read.

    Attributes:
        q_BSK: ``[B, S, K]`` Q on each state's candidates (shifted, clipped; at least float32).
        mask_BSK: ``[B, S, K]`` set membership (False past the response end).
        v_BS: ``[B, S]`` state values (0 on an empty set).
        v_next_BT: ``[B, T]`` value of each transition's next state, terminal masking applied.
        action_slot_BT: ``[B, T]`` slot of the expert action in its state's set, -1 if outside or on padding.
        action_mask_BT: ``[B, T]`` the transitions the BD terms average over.
    """

    q_BSK: torch.Tensor
    mask_BSK: torch.Tensor
    v_BS: torch.Tensor
    v_next_BT: torch.Tensor
    action_slot_BT: torch.Tensor
    action_mask_BT: torch.Tensor


@dataclass
class BDSteps:
    """A batch's transitions as both BD losses read them: ``action_slot_BT`` and ``action_mask_BT`` as in
    :class:`BDValues`, ``lengths_B`` the ``[B]`` response lengths, ``terminated_B`` ``[B]`` True after an EOS."""

    action_slot_BT: torch.Tensor
    action_mask_BT: torch.Tensor
    lengths_B: torch.Tensor
    terminated_B: torch.Tensor

    def values(self, q_BSK: torch.Tensor, mask_BSK: torch.Tensor, v_BS: torch.Tensor) -> BDValues:
        """The :class:`BDValues` of these transitions under Q ``q_BSK`` and V ``v_BS`` on the sets ``mask_BSK``."""
        v_next_BT = next_state_values(v_BS, self.lengths_B, self.terminated_B)
        return BDValues(q_BSK, mask_BSK, v_BS, v_next_BT, self.action_slot_BT, self.action_mask_BT)


def drop_eos_steps(steps: BDSteps) -> BDSteps:
    """The release's EOS masking (EOS is its pad token): each terminated response loses its EOS step and is
    bootstrapped from the state where EOS was chosen, as a truncated one."""
    eos_BT = eos_steps(steps.lengths_B, steps.terminated_B, steps.action_slot_BT.shape[1])
    return BDSteps(
        torch.where(eos_BT, torch.full_like(steps.action_slot_BT, -1), steps.action_slot_BT),
        steps.action_mask_BT & ~eos_BT,
        steps.lengths_B - steps.terminated_B.long(),
        torch.zeros_like(steps.terminated_B),
    )


# ------------------------------------------------------------------------------------------------
# Expert terms: the implicit reward r(s, a) = Q - gamma V(s') of each transition, and where it counts
# ------------------------------------------------------------------------------------------------
def expert_token_reward(x: BDValues, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The math form's ``r(s, a) = Q(s, a) - gamma V(s')`` at the expert token, ``[B, T]``, and where it counts
    (an expert action outside the set has no Q: it is dropped)."""
    return implicit_reward(gather_action(x.q_BSK, x.action_slot_BT), x.v_next_BT, gamma), x.action_slot_BT >= 0


def vocab_mean_reward(x: BDValues, gamma: float, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The released code's expert term: the masked Q (zeros outside the set) averaged over ``vocab_size`` tokens,
    minus ``gamma V(s')``, ``[B, T]``; it counts at every transition."""
    T = x.action_mask_BT.shape[1]
    q_mean_BT = x.q_BSK[:, :T].masked_fill(~x.mask_BSK[:, :T], 0.0).sum(-1) / vocab_size
    return implicit_reward(q_mean_BT, x.v_next_BT, gamma), x.action_mask_BT


# ------------------------------------------------------------------------------------------------
# The forms: -J(Q) with phi's square at the expert, at the expert and the policy, or over the vocabulary
# ------------------------------------------------------------------------------------------------
def math_form_loss(
    x: BDValues, r_BT: torch.Tensor, ok_BT: torch.Tensor, *, gamma: float, alpha: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The paper's math form ``-J(Q) = -E_D[phi(r(s, a))] + E_D[V(s) - gamma V(s')]`` (``chi2_on="expert"``).

    The fixed default (``algo=iql_bd``) and ``algo=iql_bd_math`` both use it; they differ in Q's shift.

    Args:
        x: the batch's Q and V.
        r_BT: ``[B, T]`` the expert term's implicit rewards; ``ok_BT``: where they count.
        gamma, alpha: discount and chi^2 strength.

    Returns:
        ``(loss, terms)``: the scalar loss and ``loss/reward_term``, ``loss/chi2``, ``loss/value_term``.
    """
    value_term = iq_learn_value_term(x.v_BS, x.v_next_BT, x.action_mask_BT, gamma)
    terms = {
        "loss/reward_term": masked_mean(r_BT, ok_BT),
        "loss/chi2": chi2_penalty(masked_mean(r_BT.square(), ok_BT), alpha),
        "loss/value_term": value_term,
    }
    return -(masked_mean(chi2_phi(r_BT, alpha), ok_BT) - value_term), terms


def candidate_rewards_squared(x: BDValues, gamma: float) -> torch.Tensor:
    """``r(s, a')^2`` for every candidate a' at each expert state, bootstrapped from the expert's next state,
    ``[B, T, K]``; zeroed off the set before squaring (with the set shift an empty set's Q is huge)."""
    T = x.action_mask_BT.shape[1]
    return implicit_reward(x.q_BSK[:, :T], x.v_next_BT, gamma).masked_fill(~x.mask_BSK[:, :T], 0.0).square()


def _reward_minus_chi2(
    x: BDValues, r_BT: torch.Tensor, ok_BT: torch.Tensor, squared: torch.Tensor, gamma: float, alpha: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``-J = -(E[r] - squared / (4 alpha) - E[V(s) - gamma V(s')])`` for a form whose square is not the expert's."""
    terms = {
        "loss/reward_term": masked_mean(r_BT, ok_BT),
        "loss/chi2": chi2_penalty(squared, alpha),
        "loss/value_term": iq_learn_value_term(x.v_BS, x.v_next_BT, x.action_mask_BT, gamma),
    }
    return -(terms["loss/reward_term"] - terms["loss/chi2"] - terms["loss/value_term"]), terms


def expert_and_policy_loss(
    x: BDValues, r_BT: torch.Tensor, ok_BT: torch.Tensor, *, gamma: float, alpha: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """IQ-Learn's stable variant (``chi2_on="expert_and_policy"``): phi's square averaged over the expert action
    and the student's own actions ``a' ~ pi_p(.|s)`` (no gradient through pi_p). Arguments and returns as
    :func:`math_form_loss`."""
    T = x.action_mask_BT.shape[1]
    pi_BTK = project_to_set(x.q_BSK[:, :T], x.mask_BSK[:, :T], log=False).detach()
    policy_sq_BT = (pi_BTK * candidate_rewards_squared(x, gamma)).sum(-1)
    squared = 0.5 * (masked_mean(r_BT.square(), ok_BT) + masked_mean(policy_sq_BT, x.action_mask_BT))
    return _reward_minus_chi2(x, r_BT, ok_BT, squared, gamma, alpha)


def released_form_loss(
    x: BDValues, r_BT: torch.Tensor, ok_BT: torch.Tensor, *, gamma: float, alpha: float, vocab_size: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The released code's form (``chi2_on="vocab"``): phi's square is the mean over ``vocab_size`` tokens of
    ``(Q_masked(s, a') - gamma V(s'))^2``, zeros outside the set (so those tokens add ``(gamma V(s'))^2``).
    Arguments and returns as :func:`math_form_loss`."""
    set_size_BT = x.mask_BSK[:, : x.action_mask_BT.shape[1]].sum(-1).float()
    in_set_sq_BT = candidate_rewards_squared(x, gamma).sum(-1)
    outside_sq_BT = (vocab_size - set_size_BT) * (gamma * x.v_next_BT).square()
    squared = masked_mean((in_set_sq_BT + outside_sq_BT) / vocab_size, x.action_mask_BT)
    return _reward_minus_chi2(x, r_BT, ok_BT, squared, gamma, alpha)


def lm_terms(
    logits_BSK: torch.Tensor,
    mask_BSK: torch.Tensor,
    action_mask_BT: torch.Tensor,
    vocab: VocabStats,
    teacher_logprobs_BSK: torch.Tensor | None,
    *,
    ce_coef: float,
    mass_coef: float,
    kd_coef: float,
) -> list[tuple[str, float, torch.Tensor]]:
    """BD's language-model terms with a positive weight, in the order they are added to the loss.

    Args:
        logits_BSK: ``[B, S, K]`` student logits of the candidates (at least float32); ``mask_BSK``: the sets.
        action_mask_BT: ``[B, T]`` the steps the terms average over (EOS included).
        vocab: the student's full-vocabulary NLL of the expert tokens (``nll_BT``, CE term) and log-normaliser
            (``lse_BS``, set-mass and KD terms).
        teacher_logprobs_BSK: ``[B, S, K]`` teacher log-probs of the candidates (set-mass and KD terms).
        ce_coef, mass_coef, kd_coef: weights of the CE, set-mass and KD terms (see :class:`BellmanDistillConfig`).

    Returns:
        ``[(stat key, weight, mean term), ...]``.
    """
    terms = []
    if ce_coef > 0:
        if vocab.nll_BT is None:
            raise ValueError("ce_coef > 0 needs vocab.nll_BT (the full-vocabulary NLL of the expert tokens)")
        terms.append(("loss/lm", ce_coef, masked_mean(vocab.nll_BT, action_mask_BT)))
    if mass_coef > 0 or kd_coef > 0:
        if vocab.lse_BS is None or teacher_logprobs_BSK is None:
            raise ValueError("mass_coef > 0 and kd_coef > 0 need vocab.lse_BS and teacher_logprobs_BSK (the cache's)")
        T = action_mask_BT.shape[1]
        mask_BTK, s_logits_BTK, lse_BT = mask_BSK[:, :T], logits_BSK[:, :T], upcast(vocab.lse_BS[:, :T])
        t_lp_BTK = upcast(teacher_logprobs_BSK[:, :T]).to(logits_BSK.dtype)
    if mass_coef > 0:
        mass = masked_mean(set_mass_kl(s_logits_BTK, mask_BTK, lse_BT, t_lp_BTK), action_mask_BT)
        terms.append(("loss/set_mass_kl", mass_coef, mass))
    if kd_coef > 0:
        # Token KD to the teacher's cached set: KL(teacher renormalised on A_p || student over the vocabulary).
        kd_BT = kl(project_to_set(t_lp_BTK, mask_BTK), s_logits_BTK - lse_BT[..., None], mask_BTK)
        terms.append(("loss/kd", kd_coef, masked_mean(kd_BT, action_mask_BT)))
    return terms


def vocab_shift(q_shift: str, vocab_max_BS: torch.Tensor | None) -> torch.Tensor | None:
    """The shift of :func:`shifted_q` that ``q_shift`` names: None for the set's max, else the student's max logit
    over the vocabulary (without its gradient for ``vocab_detached``)."""
    if q_shift == "set":
        return None
    if vocab_max_BS is None:
        raise ValueError(f"q_shift={q_shift!r} needs vocab.max_BS (the student's max logit over the vocabulary)")
    return upcast(vocab_max_BS.detach() if q_shift == "vocab_detached" else vocab_max_BS)


def bellman_distill_loss(
    cfg: BellmanDistillConfig,
    logits_BSK: torch.Tensor,
    mask_BSK: torch.Tensor,
    steps: BDSteps,
    *,
    vocab_size: int,
    vocab: VocabStats = VocabStats(),
    teacher_logprobs_BSK: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The BD loss of ``cfg`` from the student's logits on each state's set: the one place its options choose.

    Args:
        cfg: the options (Q shift, value, expert term, form, LM terms; see the module docstring).
        logits_BSK: ``[B, S, K]`` student logits on the candidates of states ``s_0..s_T`` (K = V when dense).
        mask_BSK: ``[B, S, K]`` top-p set membership (False at states past the response end).
        steps: the transitions (expert action slots, valid steps, response lengths, terminations).
        vocab_size: |V| the released-code terms weigh the vocabulary at (may exceed the logits' width).
        vocab: the student's full-vocabulary statistics (:meth:`CausalLMPolicy.vocab_stats`): ``max_BS`` for the
            ``q_shift`` vocab and vocab_detached, ``lse_BS`` for the released value, set-mass and KD terms, ``nll_BT``
            of the expert tokens for ``ce_coef > 0``.
        teacher_logprobs_BSK: ``[B, S, K]`` teacher log-probs of the candidates (set-mass and KD terms).

    Returns:
        ``(loss, stats)``: the scalar loss and a dict of scalar tensors (namespaced keys).
    """
    lm_action_mask_BT = steps.action_mask_BT
    if cfg.mask_eos:
        steps = drop_eos_steps(steps)
    logits_BSK = upcast(logits_BSK)
    lse_BS = None if vocab.lse_BS is None else upcast(vocab.lse_BS)
    q_BSK = shifted_q(logits_BSK, mask_BSK, cfg.q_min, vocab_shift(cfg.q_shift, vocab.max_BS))
    if cfg.value == "released":
        if lse_BS is None:
            raise ValueError("value='released' needs vocab.lse_BS (the student's log-normaliser over the vocabulary)")
        v_BS = released_state_values(q_BSK, logits_BSK, mask_BSK, lse_BS, cfg.top_p, cfg.epsilon, vocab_size)
    else:
        v_BS = state_values(q_BSK, mask_BSK)
    x = steps.values(q_BSK, mask_BSK, v_BS)

    if cfg.expert_term == "vocab_mean":
        r_BT, ok_BT = vocab_mean_reward(x, cfg.gamma, vocab_size)
    else:
        r_BT, ok_BT = expert_token_reward(x, cfg.gamma)
    if cfg.chi2_on == "vocab":
        loss, stats = released_form_loss(x, r_BT, ok_BT, gamma=cfg.gamma, alpha=cfg.alpha, vocab_size=vocab_size)
    elif cfg.chi2_on == "expert_and_policy":
        loss, stats = expert_and_policy_loss(x, r_BT, ok_BT, gamma=cfg.gamma, alpha=cfg.alpha)
    else:
        loss, stats = math_form_loss(x, r_BT, ok_BT, gamma=cfg.gamma, alpha=cfg.alpha)
    stats = {"loss/iq": loss, **stats, **bd_diagnostics(x, r_BT, ok_BT)}

    # At p = 1 the set is the whole vocabulary: both set masses are 1 and the mass term is 0 exactly.
    mass_coef = cfg.mass_coef if cfg.top_p < 1.0 else 0.0
    for key, coef, term in lm_terms(
        logits_BSK, mask_BSK, lm_action_mask_BT, vocab, teacher_logprobs_BSK,
        ce_coef=cfg.ce_coef, mass_coef=mass_coef, kd_coef=cfg.kd_coef,
    ):
        loss = loss + coef * term
        stats[key] = term
    if lse_BS is not None:
        T = lm_action_mask_BT.shape[1]
        log_m_s_BT = soft_value(logits_BSK[:, :T], mask_BSK[:, :T]) - lse_BS[:, :T]
        stats["top_p/student_set_mass"] = masked_mean(log_m_s_BT.exp(), lm_action_mask_BT)
    stats["loss/total"] = loss
    return loss, stats


def bd_diagnostics(x: BDValues, r_BT: torch.Tensor, ok_BT: torch.Tensor) -> dict[str, torch.Tensor]:
    """Q, V, reward and set statistics of one batch (for logging; no gradient needed)."""
    in_set_BT = x.action_slot_BT >= 0  # -1 marks both an action outside the set and padding
    state_ok_BS = x.mask_BSK.any(-1)
    set_size_BS = x.mask_BSK.sum(-1)
    return {
        "q/expert_mean": masked_mean(gather_action(x.q_BSK, x.action_slot_BT), in_set_BT),
        "q/set_mean": masked_mean(x.q_BSK.masked_fill(~x.mask_BSK, 0.0).sum(-1) / set_size_BS.clamp_min(1), state_ok_BS),
        "v/mean": masked_mean(x.v_BS, state_ok_BS),
        "reward/implicit_mean": masked_mean(r_BT, ok_BT),
        "top_p/set_size": masked_mean(set_size_BS.float(), state_ok_BS),
        "top_p/expert_outside_frac": masked_mean((~in_set_BT).float(), x.action_mask_BT),
    }


class BellmanDistill(Algorithm):
    """Bellman Distill: inverse soft-Q learning (IQ-Learn) with Q = student logits on the teacher's top-p MDP."""

    name = "iql_bd"

    @property
    def needs_lm_batch(self) -> bool:
        """``lm_batch = "corpus"`` with an LM term: CE and KD read a batch of the task's pre-training corpus."""
        return self.config.lm_batch == "corpus" and (self.config.ce_coef > 0 or self.config.kd_coef > 0)

    def compute_loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        on_corpus = self.needs_lm_batch
        # On the corpus the CE and KD terms are scored below, on the LM batch, not on the distillation batch.
        cfg = dataclasses.replace(self.config, ce_coef=0.0, kd_coef=0.0) if on_corpus else self.config
        loss, stats = self.distillation_loss(cfg, batch)
        if on_corpus:
            lm_loss, lm_stats = lm_batch_loss(self.policy, require_lm_batch(batch, self.name), self.config.ce_coef,
                                              self.config.kd_coef)
            loss = loss + lm_loss
            stats.update(lm_stats)
            stats["loss/total"] = loss
        return loss, float_stats(stats)

    def distillation_loss(self, cfg: BellmanDistillConfig, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of ``cfg`` on the distillation batch (its LM terms included unless they score the corpus)."""
        full_vocab = cfg.top_p >= 1.0
        h_BSD = self.policy.state_hidden(batch)
        cq = self.policy.candidate_q(batch, cfg.top_p, sparse=cfg.sparse, h_BSD=h_BSD)
        # One chunked pass over the vocabulary for everything that needs it (flat memory, exact gradients).
        vocab = self.policy.vocab_stats(
            h_BSD,
            batch.actions_BT if cfg.ce_coef > 0 else None,
            need_max=cfg.q_shift != "set",
            need_lse=cfg.value == "released" or (cfg.mass_coef > 0 and not full_vocab) or cfg.kd_coef > 0,
        )
        return bellman_distill_loss(
            cfg, cq.logits_BSK, cq.mask_BSK,
            BDSteps(cq.action_slot_BT, batch.action_mask_BT, batch.lengths_B, batch.terminated_B),
            vocab_size=cfg.released_vocab_size or self.policy.vocab_size, vocab=vocab,
            teacher_logprobs_BSK=None if full_vocab else batch.cand_logprobs_BSK,
        )
