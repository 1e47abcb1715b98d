"""Top-p (nucleus) action sets: the one implementation used by the env wrapper, the data cache and every loss.

Semantics are exactly those of transformers' ``TopPLogitsWarper``: sort the probabilities in ascending order,
drop every token whose ascending cumulative probability is ``<= 1 - p``, and always keep the
``min_keep`` most likely tokens. Hence the kept set is the shortest descending prefix whose mass is
``>= p``; ``p = 1`` keeps every token with non-zero probability.

The batched forms (the sets of all rows from one teacher call, logits and policies restricted to them) serve
the vectorised env rollouts and the on-policy algorithms; ``envs.TopPActionWrapper`` is the single-env form.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from tokenrl.core.distributions import restrict_to_set
from tokenrl.core.teachers import Teacher

PolicyFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``policy_fn(tokens_BL, lengths_B)`` returning actions ``[B]`` (integer) or next-token logits ``[B, V]``."""


def check_p(p: float) -> float:
    """Validate a top-p threshold and return it as a float.

    Raises:
        ValueError: if ``p`` is not a number in (0, 1].
    """
    try:
        p_float = float(p)
    except (TypeError, ValueError):
        raise ValueError(f"top-p threshold p must be a number in (0, 1], got {p!r}") from None
    if not (0.0 < p_float <= 1.0):
        raise ValueError(f"top-p threshold p must be in (0, 1], got p={p!r}; use p=1.0 for no restriction")
    return p_float


def top_p_mask(logits: torch.Tensor, p: float, min_keep: int = 1) -> torch.Tensor:
    """Boolean mask of the top-p set of each distribution.

    Args:
        logits: ``[..., V]`` unnormalised log-probabilities (any leading dims).
        p: threshold in (0, 1].
        min_keep: the number of most likely tokens always kept (>= 1).

    Returns:
        ``[..., V]`` bool tensor, True for tokens in the top-p set.
    """
    p = check_p(p)
    if min_keep < 1:
        raise ValueError(f"min_keep must be >= 1, got {min_keep}")
    if logits.dim() == 0:
        raise ValueError("logits must have at least one dimension (the vocabulary)")
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    # Same ops as TopPLogitsWarper (ascending sort, cumsum of softmax) so ties resolve identically. The kept
    # tokens are the sort's last positions, so where the first kept value is strictly above the last removed
    # one the set is "logit >= that value" whatever the order among equal logits: only the sorted values are
    # needed, and numpy sorts values ~10x faster than torch.sort with indices on CPU (the sort dominated a
    # sampling step at vocab 49k). Rows with a tie across the boundary take the indexed sort.
    sorted_logits = _sorted_values(flat)
    cum_probs = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cum_probs <= (1 - p)
    remove_sorted[..., -min(min_keep, vocab):] = False
    n_removed = remove_sorted.sum(-1, keepdim=True)  # a prefix: the cumsum never decreases
    first_kept = sorted_logits.gather(1, n_removed.clamp(max=vocab - 1))
    last_removed = sorted_logits.gather(1, (n_removed - 1).clamp(min=0))
    mask = (flat >= first_kept) | (n_removed == 0)
    tied = ((n_removed > 0) & (last_removed == first_kept))[:, 0]
    if bool(tied.any()):
        mask[tied] = _mask_by_indexed_sort(flat[tied], p, min_keep)
    return mask.reshape(logits.shape)


def _sorted_values(flat: torch.Tensor) -> torch.Tensor:
    """``torch.sort(flat).values`` (ascending, last dim), via numpy on CPU where numpy has the dtype."""
    if flat.device.type == "cpu" and flat.dtype in (torch.float16, torch.float32, torch.float64):
        return torch.from_numpy(np.sort(flat.detach().numpy(), axis=-1))
    return torch.sort(flat, descending=False).values


def _mask_by_indexed_sort(flat: torch.Tensor, p: float, min_keep: int) -> torch.Tensor:
    """TopPLogitsWarper's rule on ``[N, V]`` logits with torch.sort's own order among equal logits."""
    sorted_logits, sorted_idx = torch.sort(flat, descending=False)
    cum_probs = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cum_probs <= (1 - p)
    remove_sorted[..., -min(min_keep, flat.shape[-1]):] = False
    return ~remove_sorted.scatter(1, sorted_idx, remove_sorted)


@dataclass
class TopPSet:
    """Sparse top-p sets padded to a common width K.

    Attributes:
        ids: ``[..., K]`` long token ids, in descending probability; padding entries hold ``pad_id``.
        logprobs: ``[..., K]`` float log-probabilities under the *full* distribution (not renormalised);
            padding entries hold ``-inf``.
        mask: ``[..., K]`` bool, True for real members of the set.
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    mask: torch.Tensor

    @property
    def sizes(self) -> torch.Tensor:
        """``[...]`` number of tokens in each set."""
        return self.mask.sum(-1)


def top_p_sparse(
    logits: torch.Tensor, p: float, min_keep: int = 1, max_k: int | None = None, pad_id: int = 0
) -> TopPSet:
    """Kept token ids and log-probs of the top-p set, padded to the largest set size in the batch.

    Args:
        logits: ``[..., V]`` logits.
        p: threshold in (0, 1].
        min_keep: tokens always kept.
        max_k: optional cap on K. A set larger than ``max_k`` keeps its ``max_k`` most likely tokens
            (this drops mass below p; leave None for the exact rule).
        pad_id: id written in padding slots (masked out; any valid id keeps gathers in range).

    Returns:
        A :class:`TopPSet` with ``[..., K]`` tensors.
    """
    mask = top_p_mask(logits, p, min_keep)
    logprobs_full = torch.log_softmax(logits.float(), dim=-1)
    sizes = mask.sum(-1)
    k = int(sizes.max().item()) if sizes.numel() else 1
    k = max(k, 1)
    if max_k is not None:
        if max_k < 1:
            raise ValueError(f"max_k must be >= 1 or None, got {max_k}")
        k = min(k, max_k)
    keyed = logprobs_full.masked_fill(~mask, float("-inf"))
    top_lp, top_ids = torch.topk(keyed, k, dim=-1)
    valid = torch.arange(k, device=logits.device) < sizes.unsqueeze(-1)
    top_ids = torch.where(valid, top_ids, torch.full_like(top_ids, pad_id))
    top_lp = top_lp.masked_fill(~valid, float("-inf"))
    return TopPSet(ids=top_ids, logprobs=top_lp, mask=valid)


def restrict_top_p(logprobs_K: torch.Tensor, mask_K: torch.Tensor, p: float) -> torch.Tensor:
    """Shrink cached top-p sets (stored in descending order) to a smaller threshold ``p``.

    A top-p set is a descending prefix, so the set at ``p`` is the prefix of a cached set at any
    ``p_cache >= p``: token ``i`` is kept when the mass strictly before it is ``< p`` (the
    ``TopPLogitsWarper`` rule; equal up to float rounding at exact ties). The first token is always kept.

    Args:
        logprobs_K: ``[..., K]`` full-distribution log-probs of the cached set, descending.
        mask_K: ``[..., K]`` validity of the cached slots.
        p: the new threshold in (0, 1].

    Returns:
        ``[..., K]`` bool mask of the restricted set.
    """
    p = check_p(p)
    probs = torch.exp(logprobs_K.double()).masked_fill(~mask_K, 0.0)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    keep = mass_before < p
    keep[..., 0] = True
    return keep & mask_K


# ------------------------------------------------------------------------------------------------
# Batched sets and policies restricted to them (vectorised env rollouts, on-policy algorithms)
# ------------------------------------------------------------------------------------------------
def teacher_top_p_set(
    teacher: Teacher, tokens_BL: torch.Tensor, lengths_B: torch.Tensor, p: float, max_k: int | None = None
) -> TopPSet:
    """Top-p sets of the teacher at the states of all rows, from one teacher call.

    Args:
        teacher: the teacher defining the sets.
        tokens_BL: ``[B, L]`` right-padded states (e.g. ``obs["tokens_BL"]`` of the batched env).
        lengths_B: ``[B]`` real tokens per row.
        p: top-p threshold in (0, 1].
        max_k: optional cap on the set width K (see :func:`tokenrl.core.top_p.top_p_sparse`).

    Returns:
        A :class:`tokenrl.core.top_p.TopPSet` with ``[B, K]`` tensors.
    """
    return top_p_sparse(teacher.next_token_logits(tokens_BL, lengths_B).detach(), p, max_k=max_k)


def restrict_logits_to_top_p(
    student_logits_BV: torch.Tensor, teacher_logits_BV: torch.Tensor, p: float
) -> torch.Tensor:
    """Student logits with every token outside the teacher's top-p set set to ``-inf``.

    Softmax of the result is the projection of the student policy onto A_p(s).

    Args:
        student_logits_BV: ``[..., V]`` student logits.
        teacher_logits_BV: ``[..., V]`` teacher logits at the same states.
        p: top-p threshold in (0, 1].

    Returns:
        ``[..., V]`` restricted student logits (a new tensor).
    """
    if student_logits_BV.shape != teacher_logits_BV.shape:
        raise ValueError(
            f"student logits {tuple(student_logits_BV.shape)} and teacher logits "
            f"{tuple(teacher_logits_BV.shape)} must have the same shape"
        )
    keep_BV = top_p_mask(teacher_logits_BV.detach(), p).to(student_logits_BV.device)
    return restrict_to_set(student_logits_BV, keep_BV)


def top_p_restricted_policy(student_logits_fn: PolicyFn, teacher_logits_fn: PolicyFn, p: float) -> PolicyFn:
    """A ``policy_fn`` for :meth:`envs.BatchedTokenGenerationEnv.rollout` sampling the student inside the teacher's set.

    Each call runs one student forward and one teacher forward for the whole batch.

    Args:
        student_logits_fn: ``(tokens_BL, lengths_B) -> logits_BV`` of the student.
        teacher_logits_fn: the same for the teacher defining the sets (``teacher.next_token_logits`` of a
            :class:`~tokenrl.core.teachers.Teacher`).
        p: top-p threshold in (0, 1].

    Returns:
        ``policy_fn(tokens_BL, lengths_B) -> logits_BV`` with outside tokens at ``-inf``.
    """
    p = check_p(p)

    def policy_fn(tokens_BL: torch.Tensor, lengths_B: torch.Tensor) -> torch.Tensor:
        return restrict_logits_to_top_p(student_logits_fn(tokens_BL, lengths_B), teacher_logits_fn(tokens_BL, lengths_B), p)

    return policy_fn
