"""Slow or dense reference forms that only the tests use (production code uses the fast forms in ``tokenrl``)."""

from __future__ import annotations

import torch

from tokenrl.backup import soft_value
from tokenrl.synthetic import SyntheticLanguage


def scatter_mask(cand_ids: torch.Tensor, cand_mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Dense ``[..., V]`` bool mask of a sparse candidate set ``[..., K]``."""
    # Invalid slots go to an extra column: padding repeats pad_id, which may also be a real member.
    dense = torch.zeros(*cand_ids.shape[:-1], vocab_size + 1, dtype=torch.bool, device=cand_ids.device)
    ids = torch.where(cand_mask, cand_ids, torch.full_like(cand_ids, vocab_size))
    return dense.scatter(-1, ids, True)[..., :vocab_size]


def soft_value_dense(logits_BSV: torch.Tensor, cand_ids_BSK: torch.Tensor, cand_mask_BSK: torch.Tensor) -> torch.Tensor:
    """Soft value over a sparse candidate set computed from dense logits (reference for the gathered form).

    Args:
        logits_BSV: ``[..., V]`` dense Q-values.
        cand_ids_BSK: ``[..., K]`` candidate token ids.
        cand_mask_BSK: ``[..., K]`` validity of each candidate slot.

    Returns:
        ``[...]`` soft values, equal to ``soft_value(gather(logits, ids), mask)``.
    """
    return soft_value(logits_BSV, scatter_mask(cand_ids_BSK, cand_mask_BSK, logits_BSV.shape[-1]))


def sequence_logprob(
    lang: SyntheticLanguage, tokens_BL: torch.Tensor, start: int | torch.Tensor, lengths_B: torch.Tensor
) -> torch.Tensor:
    """Exact log-likelihood under ``lang`` of tokens ``[start, length)`` of each row given the tokens before.

    Returns per-token log-probs ``[B, L]`` (float64) with zeros outside ``[start, length)``.
    """
    tokens = torch.as_tensor(tokens_BL, dtype=torch.long).cpu()
    B, L = tokens.shape
    start_B1 = torch.full((B, 1), lang.start_state, dtype=torch.long)
    prev_states = torch.cat([start_B1, lang.states(tokens)[:, :-1]], dim=1)
    lp = torch.from_numpy(lang.log_emission_SV)[prev_states, tokens]
    t = torch.arange(L)[None, :]
    start_t = torch.as_tensor(start).reshape(-1, 1) if torch.is_tensor(start) else torch.full((B, 1), int(start))
    valid = (t >= start_t) & (t < torch.as_tensor(lengths_B).reshape(-1, 1).cpu())
    return torch.where(valid, lp, torch.zeros_like(lp))
