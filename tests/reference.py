"""Slow or dense reference forms that only the tests use (production code uses the fast forms in ``tokenrl``)."""

from __future__ import annotations

import math

import torch

from tokenrl.core.distributions import soft_value
from tokenrl.tasks.synthetic import SyntheticLanguage


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


def teacher_logprobs_loop(teacher, batch) -> torch.Tensor:
    """``[B, S, V]`` teacher log-probs at every state of ``batch``, one ``next_token_logits`` call per state.

    Padded states hold the uniform distribution, as in :func:`tokenrl.lm.scoring.with_teacher_logprobs`.
    """
    B, S = batch.state_mask_BS.shape
    V, P = teacher.vocab_size, batch.prompt_width
    out = torch.full((B, S, V), -math.log(V), dtype=torch.float32)
    for b in range(B):
        prompt_len, response_len = int(batch.attention_mask_BL[b, :P].sum()), int(batch.lengths_B[b])
        sequence = batch.input_ids_BL[b, P - prompt_len : P + response_len]
        for j in range(response_len + 1):
            logits_1V = teacher.next_token_logits(sequence[None, : prompt_len + j], torch.tensor([prompt_len + j]))
            out[b, j] = torch.log_softmax(logits_1V[0].float(), -1)
    return out
