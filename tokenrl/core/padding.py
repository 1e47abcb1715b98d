"""Padding of token rows: right-padded batches (storage, teacher forcing) and their left-padded form (generation)."""

from __future__ import annotations

from typing import Sequence

import torch


def right_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists into ``(tokens_BT, lengths_B)``."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    tokens = torch.full((len(seqs), int(lengths.max()) if len(seqs) else 0), pad_id, dtype=torch.long)
    for b, s in enumerate(seqs):
        tokens[b, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    return tokens, lengths


def left_pad(tokens_BT: torch.Tensor, lengths_B: torch.Tensor, pad_token_id: int) -> tuple[torch.Tensor, ...]:
    """Move right-padded rows to the right edge so every row's last real token sits in the last column.

    Args:
        tokens_BT: right-padded token ids ``[B, T]``.
        lengths_B: real tokens per row ``[B]``, each in ``1..T``.
        pad_token_id: id written into the padding.

    Returns:
        ``(tokens_BL, attention_mask_BL, position_ids_BL)`` with ``L = max(lengths_B)``; positions count
        real tokens from 0 (0 on padding).
    """
    lengths_B = lengths_B.to(tokens_BT.device)
    if int(lengths_B.min()) < 1:
        raise ValueError("Every row needs at least one real token (lengths_B >= 1); start prompts with BOS if empty.")
    width = int(lengths_B.max())
    columns_L = torch.arange(width, device=tokens_BT.device)
    shift_B1 = (width - lengths_B).unsqueeze(1)
    attention_mask_BL = columns_L.unsqueeze(0) >= shift_B1
    source_BL = (columns_L.unsqueeze(0) - shift_B1).clamp(min=0)
    tokens_BL = torch.where(attention_mask_BL, tokens_BT[:, :width].gather(1, source_BL), pad_token_id)
    position_ids_BL = torch.where(attention_mask_BL, source_BL, 0)
    return tokens_BL, attention_mask_BL.long(), position_ids_BL
