"""Toy languages: a teacher next-token distribution at every EOS-free prefix of a small vocabulary.

The testbed of the exact distillation analyses (:mod:`tokenrl.theory.bd_tabular`,
:mod:`tokenrl.theory.aliasing`): a tree of prefixes small enough that every occupancy is an exact sum. The
offline data are teacher samples drawn at top-p ``sample_p``; instead of sampling, every transition ``(s, a)``
is weighted by its expected count under that data policy (:func:`transition_weights`).

Shape suffixes: ``S`` prefixes (states), ``V`` vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
        n_states, vocab_size: ``S`` and ``V``, from ``teacher_SV``.
    """

    teacher_SV: np.ndarray
    child_SV: np.ndarray
    length_S: np.ndarray
    max_len: int
    eos_id: int = 0
    n_states: int = field(init=False)
    vocab_size: int = field(init=False)

    def __post_init__(self) -> None:
        self.n_states, self.vocab_size = self.teacher_SV.shape

    @property
    def live_S(self) -> np.ndarray:
        """``[S]`` bool, prefixes at which a token is emitted (shorter than ``max_len``)."""
        return self.length_S < self.max_len

# A toy language keeps only [S, V] tables (no dense [S, A, S] transitions), so it may have more prefixes than
# a token MDP.
_MAX_PREFIXES = 100_000


def _prefix_tree(vocab_size: int, max_len: int) -> tuple[list[tuple[int, ...]], np.ndarray, np.ndarray]:
    """Every EOS-free prefix (shortest first), ``child_SV`` and ``length_S`` of a :class:`ToyLanguage`."""
    prefixes = token_prefixes(vocab_size, max_len, max_states=_MAX_PREFIXES)
    index = {prefix: i for i, prefix in enumerate(prefixes)}
    child = np.full((len(prefixes), vocab_size), -1, dtype=np.int64)
    for s, prefix in enumerate(prefixes):
        if len(prefix) < max_len:
            for a in range(1, vocab_size):
                child[s, a] = index[prefix + (a,)]
    return prefixes, child, np.array([len(p) for p in prefixes])


def _sparse_row(
    rng: np.random.Generator, V: int, mean_support: float, concentration: float, eos_frac: float, eos_prob: float
) -> np.ndarray:
    """``[V]`` a sparse Dirichlet row over ``1 + Poisson(mean_support - 1)`` non-EOS tokens; with probability
    ``eos_frac`` it also puts ``eos_prob`` on EOS (id 0). No smoothing."""
    row = np.zeros(V)
    k = int(min(V - 1, 1 + rng.poisson(max(mean_support - 1.0, 0.0))))
    row[rng.choice(np.arange(1, V), size=k, replace=False)] = rng.dirichlet(np.full(k, concentration))
    if rng.random() < eos_frac:
        row = (1.0 - eos_prob) * row
        row[0] += eos_prob
    return row


def make_toy_language(
    vocab_size: int = 6, max_len: int = 4, *, seed: int = 0, mean_support: float = 3.0, concentration: float = 0.5,
    smoothing: float = 0.03, eos_states: float = 0.7, eos_prob: float = 0.5,
) -> ToyLanguage:
    """A tiny version of the synthetic language: sparse Dirichlet rows plus a thin uniform tail.

    Each prefix draws ``k = min(V - 1, 1 + Poisson(mean_support - 1))`` non-EOS tokens carrying
    ``Dirichlet(concentration)`` weights; a fraction ``eos_states`` of the non-empty prefixes also put
    ``eos_prob`` on EOS; ``smoothing`` is spread uniformly over the vocabulary (the thin tail that makes every
    token possible, as in :class:`tokenrl.tasks.synthetic.SyntheticLanguage`). As there, the first token is
    uniform over a few "topic" tokens (here 3), so the data visit many prefixes. The teacher at a prefix is
    drawn independently of every other prefix: it depends on the whole prefix.

    Args:
        vocab_size: tokens including EOS (id 0).
        max_len: longest response; prefixes of this length truncate.
        seed: seed of the tables.
        mean_support, concentration, smoothing, eos_states, eos_prob: see above.
    """
    rng = np.random.default_rng(seed)
    prefixes, child, length = _prefix_tree(vocab_size, max_len)
    V = vocab_size
    teacher = np.zeros((len(prefixes), V))
    for s, prefix in enumerate(prefixes):
        if len(prefix) == 0:
            row = np.zeros(V)
            row[1 : min(4, V)] = 1.0 / (min(4, V) - 1)
        else:
            row = _sparse_row(rng, V, mean_support, concentration, eos_states, eos_prob)
        teacher[s] = (1.0 - smoothing) * row + smoothing / V
    teacher /= teacher.sum(1, keepdims=True)
    return ToyLanguage(teacher, child, length, max_len)


def make_topic_language(
    vocab_size: int = 5, max_len: int = 5, *, n_topics: int = 2, seed: int = 0, mean_support: float = 2.0,
    concentration: float = 0.5, smoothing: float = 0.03, eos_rows: float = 0.5, eos_prob: float = 0.3,
) -> ToyLanguage:
    """A toy language whose teacher depends on long-range context: the topic (first token) and the last token.

    The first token is uniform over the topic tokens ``1 .. n_topics``; the topic of a prefix is
    ``(first token - 1) mod n_topics``. After it the next-token distribution is the row of a table indexed by
    ``(topic, last token)``, as :class:`tokenrl.tasks.synthetic.SyntheticLanguage` with ``transitions =
    "last_token"``: each row is a sparse Dirichlet row (see :func:`make_toy_language`; a fraction ``eos_rows`` of
    the rows put ``eos_prob`` on EOS), drawn independently per topic, plus ``smoothing`` spread uniformly. A
    student that sees only the last ``k`` tokens loses the topic once it leaves its window: it must average the
    topics' rows, and a token likely under one topic only leads it to prefixes the teacher continues differently.

    Args:
        vocab_size: tokens including EOS (id 0); needs ``vocab_size > n_topics + 1``.
        max_len: longest response; prefixes of this length truncate.
        n_topics: number of topics (>= 1).
        seed: seed of the tables.
        mean_support, concentration, smoothing, eos_rows, eos_prob: see above.
    """
    if n_topics < 1 or vocab_size <= n_topics + 1:
        raise ValueError(f"need 1 <= n_topics < vocab_size - 1, got n_topics={n_topics}, vocab_size={vocab_size}")
    rng = np.random.default_rng(seed)
    V = vocab_size
    rows_ZCV = np.zeros((n_topics, V, V))
    for z in range(n_topics):
        for c in range(1, V):
            rows_ZCV[z, c] = _sparse_row(rng, V, mean_support, concentration, eos_rows, eos_prob)
    start_V = np.zeros(V)
    start_V[1 : n_topics + 1] = 1.0 / n_topics
    prefixes, child, length = _prefix_tree(vocab_size, max_len)
    teacher = np.stack([start_V if not pre else rows_ZCV[(pre[0] - 1) % n_topics, pre[-1]] for pre in prefixes])
    teacher = (1.0 - smoothing) * teacher + smoothing / V
    teacher /= teacher.sum(1, keepdims=True)
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
