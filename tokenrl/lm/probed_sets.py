"""The top-p sets of the logits a sampler computes anyway, without sorting the vocabulary for most rows.

Data generation keeps the teacher's top-p set of every logits row it samples from
(:meth:`tokenrl.lm.sampling.TeacherSampler.with_top_p_cache`); the exact rule (:func:`tokenrl.core.top_p.top_p_sparse`)
sorts each row, the largest per-token cost of generation on a CPU. :func:`probed_top_p_sets` gives the same sets,
bit for bit, from a top-k probe, and falls back to the exact rule for the rows the probe cannot decide.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tokenrl.core.top_p import top_p_mask, top_p_sparse

PROBE_K = 64
"""Tokens per row of the top-k probe that finds most rows' top-p set without sorting the vocabulary."""

BOUNDARY_MARGIN = 1e-3
"""How far (in probability mass) the probe's tail masses at a set's boundary must lie from ``1 - p`` for the
probe to decide the row. The exact rule sums float32 probabilities of the full sorted row; the probe sums the
top-k's float64 probabilities. Both approximate the same masses to within ~4e-4 in the worst case (float32
normaliser over a 150k vocabulary, its error summed over the head), so rows nearer the boundary than this
margin, and only they, take the exact rule."""


@dataclass
class ProbedSets:
    """Top-p sets of ``[B, V]`` logits as :func:`tokenrl.core.top_p.top_p_sparse` gives them (equal ids, order and
    log-probs in each row's first ``sizes_B[b]`` slots), plus what rebuilds :func:`~tokenrl.core.top_p.top_p_mask`.

    Attributes:
        sizes_B: ``[B]`` set sizes.
        ids_BK: ``[B, K]`` member ids, descending probability (slots past a row's size are unspecified).
        logprobs_BK: ``[B, K]`` their full-distribution log-probs.
        threshold_B: ``[B]`` the smallest member logit of the probed rows (their set is ``logits >= it``).
        exact_B: ``[B]`` bool, rows whose set came from the exact rule (a tie, a boundary too close to call, or
            a set larger than the probe).
        p: the threshold the sets were computed at.
    """

    sizes_B: torch.Tensor
    ids_BK: torch.Tensor
    logprobs_BK: torch.Tensor
    threshold_B: torch.Tensor
    exact_B: torch.Tensor
    p: float

    def mask(self, logits_BV: torch.Tensor) -> torch.Tensor:
        """The sets as a ``[B, V]`` mask of the logits they were computed from (equal to ``top_p_mask``)."""
        mask_BV = logits_BV >= self.threshold_B[:, None]
        if bool(self.exact_B.any()):
            mask_BV[self.exact_B] = top_p_mask(logits_BV[self.exact_B], self.p)
        return mask_BV

    def to_numpy(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The cache's storage types: sizes int32 ``[B]``, ids int32 and log-probs float16 ``[B, K]``."""
        return (
            self.sizes_B.cpu().numpy().astype(np.int32),
            self.ids_BK.cpu().numpy().astype(np.int32),
            self.logprobs_BK.cpu().numpy().astype(np.float16),
        )


def probed_top_p_sets(logits_BV: torch.Tensor, logprobs_BV: torch.Tensor, p: float) -> ProbedSets:
    """The top-p sets of ``[B, V]`` float32 logits, equal to :func:`tokenrl.core.top_p.top_p_sparse` but without
    sorting the vocabulary for most rows.

    ``top_p_sparse`` sorts every row (``TopPLogitsWarper``'s rule: drop the tokens whose ascending cumulative
    probability is ``<= 1 - p``), the largest per-token cost of data generation on a CPU. A top-k probe
    (:data:`PROBE_K` tokens) decides a row when its set ends inside the probe, the float64 tail masses at the
    boundary lie more than :data:`BOUNDARY_MARGIN` from ``1 - p`` (so the exact rule, which sums float32
    probabilities, decides the same way), and the probed log-probs strictly decrease up to one past the boundary
    (no tie, so the set is ``logits >= the last member's`` and its order is unique). The other rows take
    ``top_p_sparse`` itself.

    Args:
        logits_BV: ``[B, V]`` float32 logits.
        logprobs_BV: ``log_softmax(logits_BV)``, which the sampler computes anyway.
        p: threshold in (0, 1].
    """
    B, V = logits_BV.shape
    k = min(PROBE_K, V)
    top_lp_BK, top_ids_BK = torch.topk(logprobs_BV, k, dim=-1)
    q_BK = top_lp_BK.double().exp()
    tail_BK = 1.0 - (q_BK.cumsum(-1) - q_BK)  # mass of each probed token and every smaller one
    keep_BK = tail_BK > 1.0 - p
    keep_BK[:, 0] = True  # min_keep = 1
    size_B = keep_BK.sum(-1)  # a prefix: the tail mass never increases
    last_B1, next_B1 = (size_B - 1)[:, None], size_B.clamp(max=k - 1)[:, None]
    strict_BK = torch.ones_like(keep_BK)
    strict_BK[:, : k - 1] = top_lp_BK[:, :-1] > top_lp_BK[:, 1:]
    probed_B = (
        (size_B < k)
        & ((tail_BK.gather(1, last_B1)[:, 0] > 1.0 - p + BOUNDARY_MARGIN) | (size_B == 1))
        & (tail_BK.gather(1, next_B1)[:, 0] <= 1.0 - p - BOUNDARY_MARGIN)
        & (strict_BK | (torch.arange(k, device=logits_BV.device) >= size_B[:, None])).all(-1)
    )
    threshold_B = logits_BV.gather(1, top_ids_BK.gather(1, last_B1))[:, 0]
    exact_B = ~probed_B
    if not bool(exact_B.any()):
        width = int(size_B.max())
        return ProbedSets(size_B, top_ids_BK[:, :width], top_lp_BK[:, :width], threshold_B, exact_B, p)
    exact = top_p_sparse(logits_BV[exact_B], p)
    size_B = size_B.masked_scatter(exact_B, exact.sizes)
    width = max(int(size_B.max()), exact.ids.shape[1])
    ids_BK = torch.zeros(B, width, dtype=top_ids_BK.dtype, device=logits_BV.device)
    logprobs_BK = torch.full((B, width), float("-inf"), dtype=top_lp_BK.dtype, device=logits_BV.device)
    cols = min(width, k)
    ids_BK[:, :cols], logprobs_BK[:, :cols] = top_ids_BK[:, :cols], top_lp_BK[:, :cols]
    ids_BK[exact_B, : exact.ids.shape[1]] = exact.ids
    logprobs_BK[exact_B, : exact.ids.shape[1]] = exact.logprobs
    return ProbedSets(size_B, ids_BK, logprobs_BK, threshold_B, exact_B, p)
