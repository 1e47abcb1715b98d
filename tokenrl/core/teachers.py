"""The teacher interface: anything that gives next-token logits for a batch of token prefixes.

Implemented by :class:`tokenrl.tasks.synthetic.SyntheticLanguage` (exact, the default task) and by the
transformers adapter in :mod:`tokenrl.lm.models`. The env wrapper, the offline data generator and the
evaluation only talk to this interface.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol, runtime_checkable

import torch


@dataclass(frozen=True, eq=False)
class TokenPositions:
    """A right-padded token batch and the logit positions of it to score.

    Logit position ``(b, t)`` is the distribution of token ``t + 1`` of row ``b`` given ``tokens_BT[b, : t + 1]``.
    Built by :func:`tokenrl.lm.scoring.state_positions`.

    Attributes:
        tokens_BT: ``[B, T]`` token ids, right-padded.
        lengths_B: ``[B]`` real tokens per row.
        rows_N, cols_N: ``[N]`` long positions, row-major (rows non-decreasing), each
            ``cols_N < lengths_B[rows_N]``.
    """

    tokens_BT: torch.Tensor
    lengths_B: torch.Tensor
    rows_N: torch.Tensor
    cols_N: torch.Tensor

    def __len__(self) -> int:
        """``N``, the number of positions."""
        return len(self.rows_N)


@runtime_checkable
class Teacher(Protocol):
    """A next-token distribution over a shared vocabulary.

    Token batches are right-padded: row ``b`` holds ``lengths_B[b]`` real tokens followed by padding.
    """

    vocab_size: int
    eos_token_id: int

    def next_token_logits(self, tokens_BT: torch.Tensor, lengths_B: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, V]`` of the token that follows the first ``lengths_B[b]`` tokens of each row."""
        ...

    def sequence_logits(self, tokens_BT: torch.Tensor, lengths_B: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits ``[B, T, V]``: entry ``t`` is the distribution of token ``t + 1``
        given ``tokens_BT[b, : t + 1]``. Entries at ``t >= lengths_B[b]`` are unspecified.

        Dense over the whole width: scoring code uses :meth:`position_logits` instead."""
        ...

    def position_logits(self, at: TokenPositions, chunk: int) -> Iterator[torch.Tensor]:
        """Teacher-forced logits at the positions ``(at.rows_N, at.cols_N)`` only, ``chunk`` positions at a time.

        Equals ``sequence_logits(at.tokens_BT, at.lengths_B)[at.rows_N, at.cols_N]`` (float32, on the device
        of ``at.tokens_BT``) without ever holding ``[B, T, V]``: yields ``[n, V]`` blocks, ``n <= chunk``, in
        the order of the positions. See :mod:`tokenrl.lm.scoring`.
        """
        ...
