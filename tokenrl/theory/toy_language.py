"""Toy languages: a teacher next-token distribution at every EOS-free prefix of a small vocabulary.

The testbed of the exact distillation analyses (:mod:`tokenrl.theory.bd_tabular`,
:mod:`tokenrl.theory.aliasing`): a tree of prefixes small enough that every occupancy is an exact sum. The
offline data are teacher samples drawn at top-p ``sample_p``; instead of sampling, every transition ``(s, a)``
is weighted by its expected count under that data policy (:func:`transition_weights`).

Shape suffixes: ``S`` prefixes (states), ``V`` vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tokenrl.theory.mdps import token_prefixes
from tokenrl.theory.tabular import project_policy, top_p_support


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
