"""Bellman Distill (BD): Inverse soft-Q Learning (IQ-Learn, Garg et al. 2021) on the teacher's top-p MDP.

Registered as ``iql_bd`` (the default, fixed variant), ``iql_bd_math`` (the paper's math form),
``iql_bd_released`` (the released code's form) and ``bd_kd`` (BD + KD, a matched-information arm);
``algo=<name>`` on the command line, one class each.

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
*vocabulary*, which pins the value level (Q <= 0, V_p >= 0 while the argmax is in the set). The chi^2 penalty
wants levels V_p(s') ~ Q(s, a) / gamma <= 0, reachable only by putting a token *outside* the set at the max,
so the exact optimum moves mass out of the teacher's set (argmax outside at 58% of states on the toy), and
``algo=iql_bd_math`` ends worse than its SFT start on the synthetic task. The default ``iql_bd`` shifts by
the max over the set (``q_shift="set"``: the incentive is gone, the TD part is purely O(K)), keeps the LM
term (``ce_coef=1``: under the set shift it is the only thing that holds the mass outside the set down) and
uses ``alpha=1`` (the chi^2 penalty's in-set bias shrinks as 1/alpha). Measured on the synthetic task
(docs/bd_diagnosis.md), it is the only candidate that ends better than its SFT start on teacher NLL,
KL(student||teacher) and the on-policy reverse KL (3 seeds; it is worse on KL(teacher||student)); alpha 0.1
ends worse, and the set-mass term (``mass_coef``, which matches the
student's total mass on the set to the teacher's, tabularly exact) hurts with a network: it fixes the outside
mass's total but not where it goes, and the student's samples drift to tokens the teacher rates low.

Options (see :class:`BellmanDistillConfig`):
* ``q_shift``: ``"set"`` (default), ``"vocab"`` (paper: the max logit over the vocabulary, gradient through
  it) or ``"vocab_detached"`` (the same constant without gradient).
* ``chi2_on``: where phi's square is applied. ``"expert"`` (as written above); ``"expert_and_policy"``
  (IQ-Learn's stable variant: the square averaged over the expert action and the student's own actions
  a' ~ pi_p(.|s) at the same state, bootstrapping with the expert's next state); ``"vocab"`` (the released
  BD code: the square over the whole vocabulary of the masked Q, zeros outside the set).
* ``expert_term = "vocab_mean"``: the released code's expert term, the masked Q averaged over the vocabulary
  instead of Q at the expert token.
* ``value = "released"``: the released projection softmax(logits) * mask / p + ``epsilon``, renormalised over
  ``released_vocab_size`` tokens, and V = its entropy-regularised expectation of the masked Q
  (:func:`tokenrl.core.backup.released_state_values`); ``mask_eos`` drops the EOS step from the BD terms (the
  release pads with EOS).
* LM terms: ``ce_coef`` (full-vocabulary CE on the tokens), ``kd_coef`` (token KD to the teacher's cached set),
  both on the batch ``lm_batch`` names: ``"corpus"``, a separate batch of the task's pre-training corpus (the
  paper's and the release's form: the released trainer computes ``pt_loss(lm_batch)`` on OpenWebText;
  :mod:`tokenrl.tasks.corpus`), or ``"expert"``, the distillation batch itself (which makes BD into BD + BC);
  ``mass_coef`` (the set-mass term, on the distillation batch).

Presets: ``iql_bd`` keeps ``lm_batch = "expert"``: its CE on the expert batch is what holds its mass outside the
teacher's set down under the set shift (docs/bd_diagnosis.md), so it is BD + BC by design. ``iql_bd_math`` and
``iql_bd_released`` put the LM term on the corpus, as the paper and the release do. ``bd_kd`` is the matched-
information arm BD + KD (the fixed variant with token KD to the cached set on the distillation batch instead of
CE), next to ``kd_pbc`` (:mod:`algorithms.kd`: KD + projected BC, the same information without the TD terms).

Still not as in the paper: its LM term is CE plus token KD to the teacher (weights unpublished) where
``iql_bd_math`` has CE alone, and the released trainer's KD term reads the teacher's full distribution on the
OpenWebText batch where ours reads the teacher's cached top-p set on the corpus batch. Its optimiser (lr 5e-6,
100 warm-up steps then cosine, no clipping, pretrained students) is not this task's (tiny fresh students).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from algorithms.base import AlgoConfig, Algorithm, float_stats
from algorithms.kd import lm_terms
from tokenrl.core.backup import (
    chi2_penalty,
    chi2_phi,
    gather_action,
    implicit_reward,
    iq_learn_value_term,
    kl,
    masked_mean,
    next_state_values,
    project_to_set,
    released_state_values,
    set_mass_kl,
    shifted_q,
    soft_value,
    state_values,
    upcast,
)
from tokenrl.data.buffer import Batch, require_lm_batch

CHI2_CHOICES = ("expert", "expert_and_policy", "vocab")
EXPERT_TERM_CHOICES = ("math", "vocab_mean")
Q_SHIFT_CHOICES = ("vocab", "vocab_detached", "set")
VALUE_CHOICES = ("soft", "released")
LM_BATCH_CHOICES = ("expert", "corpus")


def _shift(vocab_max_BS: torch.Tensor | None, q_shift: str) -> torch.Tensor | None:
    """The per-state constant subtracted from the logits (None = the max over the set)."""
    if q_shift == "set":
        return None
    return vocab_max_BS.detach() if q_shift == "vocab_detached" else vocab_max_BS


@dataclass
class BellmanDistillConfig(AlgoConfig):
    """Bellman Distill (inverse soft-Q learning) settings; the defaults are the fixed variant (``algo=iql_bd``).

    Presets: ``algo=iql_bd`` (fixed: set shift, alpha 1, CE on the expert batch, i.e. BD + BC: that CE holds the
    mass outside the set down), ``algo=iql_bd_math`` (the paper's math form), ``algo=iql_bd_released`` (the
    released code's form), ``algo=bd_kd`` (BD + KD). Paper: gamma 0.99, p 0.8, alpha 0.1, q_min -10.
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
    lm_batch: str = "expert"  # the batch the CE and KD terms score: expert (the distillation batch) | corpus (pre-training)
    sparse: bool = True  # gather candidate rows of the output embedding (O(K)) instead of dense logits

    def __post_init__(self):
        super().__post_init__()
        if self.lm_batch not in LM_BATCH_CHOICES:
            raise ValueError(f"iql_bd.lm_batch must be one of {LM_BATCH_CHOICES}, got {self.lm_batch!r}")

    def reads_cached_sets(self) -> bool:
        """At ``top_p = 1`` the BD terms take dense logits over the whole vocabulary, not the cached sets (the KD
        term, which reads them, is refused there by the run validation)."""
        return self.top_p < 1.0


def iq_bd_loss(
    logits_BSK: torch.Tensor,
    mask_BSK: torch.Tensor,
    max_logit_BS: torch.Tensor | None,
    action_slot_BT: torch.Tensor,
    action_mask_BT: torch.Tensor,
    lengths_B: torch.Tensor,
    terminated_B: torch.Tensor,
    *,
    gamma: float,
    alpha: float,
    q_min: float | None,
    vocab_size: int,
    chi2_on: str = "expert",
    expert_term: str = "math",
    value: str = "soft",
    top_p: float = 0.8,
    epsilon: float = 1e-8,
    mask_eos: bool = False,
    ce_coef: float = 0.0,
    lm_nll_BT: torch.Tensor | None = None,
    mass_coef: float = 0.0,
    kd_coef: float = 0.0,
    lse_BS: torch.Tensor | None = None,
    teacher_logprobs_BSK: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The BD loss ``-J(Q)`` (+ optional LM term) from the student's logits on each state's action set.

    Args:
        logits_BSK: ``[B, S, K]`` student logits on the candidates of states ``s_0..s_T`` (K = V when dense).
        mask_BSK: ``[B, S, K]`` top-p set membership (False at states past the response end).
        max_logit_BS: ``[B, S]`` the student's max logit over the vocabulary (the paper's Q shift), or None
            to shift by the max over the set.
        action_slot_BT: ``[B, T]`` slot of the expert action in its state's set, -1 if outside or on padding.
        action_mask_BT: ``[B, T]`` valid response steps.
        lengths_B: ``[B]`` response lengths.
        terminated_B: ``[B]`` True where the response ended with EOS (``V = 0`` after it).
        gamma, alpha, q_min: see :class:`BellmanDistillConfig`.
        vocab_size: |V| the released-code options weigh the vocabulary at (may exceed the logits' width).
        chi2_on, expert_term, value, top_p, epsilon, mask_eos, ce_coef, mass_coef, kd_coef: see
            :class:`BellmanDistillConfig` (``top_p`` and ``epsilon`` are read by ``value = "released"`` only).
        lm_nll_BT: ``[B, T]`` full-vocabulary NLL of the expert tokens (needed when ``ce_coef > 0``).
        lse_BS: ``[B, S]`` the student's log-normaliser over the whole vocabulary (needed by the set-mass term,
            the KD term and the released value).
        teacher_logprobs_BSK: ``[B, S, K]`` teacher log-probabilities of the candidates (needed by the
            set-mass and KD terms).

    Returns:
        ``(loss, stats)``: the scalar loss and a dict of scalar tensors (namespaced keys).
    """
    if chi2_on not in CHI2_CHOICES:
        raise ValueError(f"chi2_on must be one of {CHI2_CHOICES}, got {chi2_on!r}")
    if expert_term not in EXPERT_TERM_CHOICES:
        raise ValueError(f"expert_term must be one of {EXPERT_TERM_CHOICES}, got {expert_term!r}")
    if value not in VALUE_CHOICES:
        raise ValueError(f"value must be one of {VALUE_CHOICES}, got {value!r}")
    needs_lse = value == "released" or mass_coef > 0 or kd_coef > 0
    if needs_lse and lse_BS is None:
        raise ValueError("value='released', mass_coef > 0 and kd_coef > 0 need lse_BS (the vocabulary log-normaliser)")
    if (mass_coef > 0 or kd_coef > 0) and teacher_logprobs_BSK is None:
        raise ValueError("mass_coef > 0 and kd_coef > 0 need teacher_logprobs_BSK (the cache's set log-probs)")
    T = action_slot_BT.shape[1]
    lm_action_mask_BT = action_mask_BT
    if mask_eos:
        # The release pads with EOS: the EOS step leaves the BD terms and the response is bootstrapped from
        # the state where EOS was chosen, as a truncated one (the LM terms still see EOS).
        t_T = torch.arange(T, device=action_slot_BT.device)[None, :]
        eos_step_BT = terminated_B[:, None] & (t_T == lengths_B[:, None] - 1)
        action_mask_BT = action_mask_BT & ~eos_step_BT
        action_slot_BT = torch.where(eos_step_BT, torch.full_like(action_slot_BT, -1), action_slot_BT)
        lengths_B = lengths_B - terminated_B.long()
        terminated_B = torch.zeros_like(terminated_B)
    logits_BSK = upcast(logits_BSK)
    max_logit_BS = None if max_logit_BS is None else upcast(max_logit_BS)
    lse_BS = None if lse_BS is None else upcast(lse_BS)
    q_BSK = shifted_q(logits_BSK, mask_BSK, q_min, max_logit_BS)
    state_ok_BS = mask_BSK.any(-1)
    if value == "released":
        v_BS = released_state_values(q_BSK, logits_BSK, mask_BSK, lse_BS, top_p, epsilon, vocab_size)
    else:
        v_BS = state_values(q_BSK, mask_BSK)
    v_next_BT = next_state_values(v_BS, lengths_B, terminated_B)
    in_set_BT = action_slot_BT >= 0  # -1 marks both an action outside the set and padding

    q_sa_BT = gather_action(q_BSK, action_slot_BT)
    q_in_set_BSK = q_BSK.masked_fill(~mask_BSK, 0.0)
    if expert_term == "vocab_mean":
        q_sa_BT = q_in_set_BSK[:, :T].sum(-1) / vocab_size
        expert_ok_BT = action_mask_BT
    else:
        expert_ok_BT = in_set_BT
    r_BT = implicit_reward(q_sa_BT, v_next_BT, gamma)
    reward_term = masked_mean(r_BT, expert_ok_BT)

    if chi2_on == "expert":
        sq = masked_mean(r_BT.square(), expert_ok_BT)
    else:
        # r(s, a') for every candidate a' at the expert's state, bootstrapped from the expert's next state.
        mask_BTK = mask_BSK[:, :T]
        # Zeroed off the set before squaring: with the set shift an empty set's Q is huge (inf when squared).
        r_all_sq_BTK = implicit_reward(q_BSK[:, :T], v_next_BT, gamma).masked_fill(~mask_BTK, 0.0).square()
        if chi2_on == "expert_and_policy":
            pi_BTK = project_to_set(q_BSK[:, :T], mask_BTK, log=False).detach()
            policy_sq_BT = (pi_BTK * r_all_sq_BTK).sum(-1)
            sq = 0.5 * (masked_mean(r_BT.square(), expert_ok_BT) + masked_mean(policy_sq_BT, action_mask_BT))
        else:
            # Released code: mean over the whole vocabulary of (Q_masked - gamma V')^2, zeros outside the set.
            set_size_BT = mask_BTK.sum(-1).float()
            in_set_sq_BT = r_all_sq_BTK.sum(-1)
            outside_sq_BT = (vocab_size - set_size_BT) * (gamma * v_next_BT).square()
            sq = masked_mean((in_set_sq_BT + outside_sq_BT) / vocab_size, action_mask_BT)
    chi2 = chi2_penalty(sq, alpha)
    value_term = iq_learn_value_term(v_BS, v_next_BT, action_mask_BT, gamma)
    if chi2_on == "expert":
        objective = masked_mean(chi2_phi(r_BT, alpha), expert_ok_BT) - value_term
    else:
        objective = reward_term - chi2 - value_term
    loss = -objective
    stats = {
        "loss/iq": -objective,
        "loss/reward_term": reward_term,
        "loss/chi2": chi2,
        "loss/value_term": value_term,
        "q/expert_mean": masked_mean(gather_action(q_BSK, action_slot_BT), in_set_BT),
        "q/set_mean": masked_mean(q_in_set_BSK.sum(-1) / mask_BSK.sum(-1).clamp_min(1), state_ok_BS),
        "v/mean": masked_mean(v_BS, state_ok_BS),
        "reward/implicit_mean": masked_mean(r_BT, expert_ok_BT),
        "top_p/set_size": masked_mean(mask_BSK.sum(-1).float(), state_ok_BS),
        "top_p/expert_outside_frac": masked_mean((~in_set_BT).float(), action_mask_BT),
    }
    if ce_coef > 0:
        if lm_nll_BT is None:
            raise ValueError("ce_coef > 0 needs lm_nll_BT (the full-vocabulary NLL of the expert tokens)")
        nll = masked_mean(lm_nll_BT, lm_action_mask_BT)
        loss = loss + ce_coef * nll
        stats["loss/lm"] = nll
    if mass_coef > 0 or kd_coef > 0:
        mask_BTK, s_logits_BTK, lse_BT = mask_BSK[:, :T], logits_BSK[:, :T], lse_BS[:, :T]
        t_lp_BTK = upcast(teacher_logprobs_BSK[:, :T]).to(logits_BSK.dtype)
    if mass_coef > 0:
        mass = masked_mean(set_mass_kl(s_logits_BTK, mask_BTK, lse_BT, t_lp_BTK), lm_action_mask_BT)
        loss = loss + mass_coef * mass
        stats["loss/set_mass_kl"] = mass
    if kd_coef > 0:
        # Token KD to the teacher's cached set: KL(teacher renormalised on A_p || student over the vocabulary).
        kd_BT = kl(project_to_set(t_lp_BTK, mask_BTK), s_logits_BTK - lse_BT[..., None], mask_BTK)
        kd = masked_mean(kd_BT, lm_action_mask_BT)
        loss = loss + kd_coef * kd
        stats["loss/kd"] = kd
    if lse_BS is not None:
        log_m_s_BT = soft_value(logits_BSK[:, :T], mask_BSK[:, :T]) - lse_BS[:, :T]
        stats["top_p/student_set_mass"] = masked_mean(log_m_s_BT.exp(), lm_action_mask_BT)
    stats["loss/total"] = loss
    return loss, stats


class BellmanDistill(Algorithm):
    """Bellman Distill: inverse soft-Q learning (IQ-Learn) with Q = student logits on the teacher's top-p MDP."""

    name = "iql_bd"

    @property
    def needs_lm_batch(self) -> bool:
        """``lm_batch = "corpus"`` with an LM term: CE and KD read a batch of the task's pre-training corpus."""
        return self.config.lm_batch == "corpus" and (self.config.ce_coef > 0 or self.config.kd_coef > 0)

    def compute_loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.config
        if cfg.q_shift not in Q_SHIFT_CHOICES:
            raise ValueError(f"iql_bd.q_shift must be one of {Q_SHIFT_CHOICES}, got {cfg.q_shift!r}")
        if cfg.kd_coef > 0 and cfg.top_p >= 1.0:
            raise ValueError("iql_bd.kd_coef > 0 needs top_p < 1 (KD reads the teacher's cached set); set kd_coef=0")
        full_vocab = cfg.top_p >= 1.0
        # At p = 1 the set is the whole vocabulary: both set masses are 1 and the mass term is 0 exactly.
        mass_coef = 0.0 if full_vocab else cfg.mass_coef
        # The LM terms go into iq_bd_loss on the distillation batch (expert), or are added below on the corpus batch.
        on_corpus = self.needs_lm_batch
        ce_coef, kd_coef = (0.0, 0.0) if on_corpus else (cfg.ce_coef, cfg.kd_coef)
        h_BSD = self.policy.state_hidden(batch)
        cq = self.policy.candidate_q(batch, cfg.top_p, sparse=cfg.sparse, h_BSD=h_BSD)
        # One chunked pass over the vocabulary for everything that needs it (flat memory, exact gradients).
        stats_v = self.policy.vocab_stats(
            h_BSD,
            batch.actions_BT if ce_coef > 0 else None,
            need_max=cfg.q_shift != "set",
            need_lse=cfg.value == "released" or mass_coef > 0 or kd_coef > 0,
        )
        loss, stats = iq_bd_loss(
            cq.logits_BSK,
            cq.mask_BSK,
            _shift(stats_v.max_BS, cfg.q_shift),
            cq.action_slot_BT,
            batch.action_mask_BT,
            batch.lengths_B,
            batch.terminated_B,
            gamma=cfg.gamma,
            alpha=cfg.alpha,
            q_min=cfg.q_min,
            vocab_size=cfg.released_vocab_size or self.policy.vocab_size,
            chi2_on=cfg.chi2_on,
            expert_term=cfg.expert_term,
            value=cfg.value,
            top_p=cfg.top_p,
            epsilon=cfg.epsilon,
            mask_eos=cfg.mask_eos,
            ce_coef=ce_coef,
            lm_nll_BT=stats_v.nll_BT,
            mass_coef=mass_coef,
            kd_coef=kd_coef,
            lse_BS=stats_v.lse_BS,
            teacher_logprobs_BSK=None if full_vocab else batch.cand_logprobs_BSK,
        )
        if on_corpus:
            lm_loss, lm_stats = lm_terms(self.policy, require_lm_batch(batch, self.name), cfg.ce_coef, cfg.kd_coef)
            loss = loss + lm_loss
            stats.update(lm_stats)
            stats["loss/total"] = loss
        return loss, float_stats(stats)


@dataclass
class BellmanDistillMathConfig(BellmanDistillConfig):
    """The paper's math form (``algo=iql_bd_math``): vocabulary-max Q shift, phi at the expert token, LM term (CE)
    on a pre-training batch."""

    alpha: float = 0.1
    q_shift: str = "vocab"
    mass_coef: float = 0.0
    ce_coef: float = 1.0
    lm_batch: str = "corpus"


@dataclass
class BellmanDistillReleasedConfig(BellmanDistillConfig):
    """The released code's form (``algo=iql_bd_released``), as described in ``/work/shared/bellman-distill.md``.

    Vocabulary-mean expert term and chi^2 over the vocabulary, both weighted at the release's |V| = 151936;
    EOS masked out of the BD terms (it is the pad token there); projection ``softmax(Q) * mask / p + epsilon``
    renormalised, with V the entropy-regularised expectation under it; LM term 0.5 CE + 0.5 token KD on a
    pre-training batch. ``epsilon`` and the LM weight are unpublished: 1e-8 and 1 here.
    """

    alpha: float = 0.1
    q_shift: str = "vocab"
    chi2_on: str = "vocab"
    expert_term: str = "vocab_mean"
    value: str = "released"
    released_vocab_size: int = 151936
    mask_eos: bool = True
    mass_coef: float = 0.0
    ce_coef: float = 0.5
    kd_coef: float = 0.5
    lm_batch: str = "corpus"


class BellmanDistillMath(BellmanDistill):
    """Bellman Distill in the paper's math form (see :class:`BellmanDistillMathConfig`)."""

    name = "iql_bd_math"


class BellmanDistillReleased(BellmanDistill):
    """Bellman Distill as the released code computes it (see :class:`BellmanDistillReleasedConfig`)."""

    name = "iql_bd_released"


@dataclass
class BellmanDistillKDConfig(BellmanDistillConfig):
    """The matched-information arm ``bd_kd``: the fixed variant with token KD to the teacher's cached set (weight
    1) instead of CE, on the distillation batch; compare with ``kd_pbc`` and ``kd``."""

    ce_coef: float = 0.0
    kd_coef: float = 1.0


class BellmanDistillKD(BellmanDistill):
    """Bellman Distill + KD (see :class:`BellmanDistillKDConfig`)."""

    name = "bd_kd"
