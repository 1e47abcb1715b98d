"""Which buffer rows make each training batch: the one interface the trainer draws every batch through.

A sampler returns the rows (trajectory indices) of one global batch, drawn with the run's seeded generator;
the trainer splits them over ranks and micro-steps when it may (:attr:`BatchSampler.splittable`) and collates
each part (:meth:`~tokenrl.data.buffer.ReplayBuffer.collate`). Every algorithm has one
(:meth:`algorithms.base.Algorithm.make_sampler`):

* :class:`BatchSampler` (offline algorithms, and the pre-training batch of an algorithm with ``needs_lm_batch``):
  every row uniformly from the whole buffer, with replacement;
* :class:`RolloutMix` (on-policy algorithms): a fraction of the rows from the newest rollout batch, the rest
  from the teacher data.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from tokenrl.data.buffer import Batch, ReplayBuffer


class BatchSampler:
    """Every row of a batch uniformly from the whole buffer, with replacement (teacher data and any rollouts in it).

    Attributes:
        splittable: whether the rows of one batch may be split over ranks and gradient-accumulation micro-steps
            (the trainer refuses torchrun and ``micro_batch_size`` for a sampler that is not).
    """

    splittable: bool = True

    def rows(self, buffer: ReplayBuffer, batch_size: int, generator: torch.Generator) -> list[int]:
        """The ``batch_size`` rows of the next batch (the stream of :meth:`ReplayBuffer.sample`).

        Raises:
            ValueError: the buffer is empty.
        """
        if len(buffer) == 0:
            raise ValueError("cannot sample from an empty replay buffer; add data first")
        return torch.randint(len(buffer), (batch_size,), generator=generator).tolist()

    def rollouts_added(self, indices: Sequence[int]) -> None:
        """Told the rows of the rollouts just added to the buffer (the uniform draw needs no bookkeeping)."""

    def batch(self, buffer: ReplayBuffer, batch_size: int, generator: torch.Generator, top_p: float | None) -> Batch:
        """The next batch in one piece (one process, no accumulation): :meth:`rows`, collated at ``top_p``."""
        return buffer.collate(self.rows(buffer, batch_size, generator), top_p=top_p)


class RolloutMix(BatchSampler):
    """``round(rollout_frac * batch_size)`` rows from the newest rollout batch, the rest from the teacher data.

    Both parts are drawn uniformly with replacement, the rollout rows first. Not splittable: a split would give
    micro-batches of one kind each, and a loss that compares the rows of a batch (MiniLLM's leave-one-out
    baseline) would see other batches.

    Args:
        rollout_frac: fraction of each batch from the newest rollouts, in [0, 1] (GKD: ``lmbda``; MiniLLM: 1).

    Attributes:
        newest: buffer rows of the newest rollout batch (:meth:`rollouts_added`).
    """

    splittable = False

    def __init__(self, rollout_frac: float):
        self.rollout_frac = rollout_frac
        self.newest: list[int] = []

    def rollouts_added(self, indices: Sequence[int]) -> None:
        """Keep ``indices`` as the newest rollout batch."""
        self.newest = list(indices)

    def rows(self, buffer: ReplayBuffer, batch_size: int, generator: torch.Generator) -> list[int]:
        """The rollout rows, then the teacher rows (``is_expert``).

        Raises:
            ValueError: rollout rows are asked for but none were collected yet, or teacher rows are asked for
                but the buffer holds no teacher data.
        """
        n_rollout = round(self.rollout_frac * batch_size)
        if n_rollout and not self.newest:
            raise ValueError(
                "the batch needs student rollouts but none were collected; the trainer collects them every "
                "rollout_every steps, starting at the first step (set rollout_every > 0)"
            )
        rows = []
        if n_rollout:
            picks = torch.randint(len(self.newest), (n_rollout,), generator=generator).tolist()
            rows = [int(self.newest[i]) for i in picks]
        if n_rollout < batch_size:
            expert = np.flatnonzero(np.asarray(buffer.is_expert, dtype=bool))
            if len(expert) == 0:
                raise ValueError("the batch needs teacher data (is_expert=True) but the buffer holds none")
            picks = torch.randint(len(expert), (batch_size - n_rollout,), generator=generator).tolist()
            rows += [int(expert[i]) for i in picks]
        return rows
