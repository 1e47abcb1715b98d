"""Checkpoints of the SFT warm start, so that a long SFT is as protected as training.

``<out_dir>/checkpoints/sft-XXXXXXXX.safetensors`` (:mod:`tokenrl.run.checkpoint`'s format: verified on load, the
newest ``keep_checkpoints`` kept) holds the SFT algorithm (student, optimiser, schedule), the batch generator and
torch's RNG, the loop of :func:`tokenrl.run.selection.train_sft` (steps run, its validations, the stopping rule,
the best weights so far), the results before it (the reference evaluations) and the config. It is written every
``checkpoint_every`` SFT steps, every ``checkpoint_seconds`` and on SIGTERM/SIGINT (after the current update,
then the run stops); ``resume=true`` continues the SFT from the newest one bit-identically, as from a training
checkpoint. The algorithm's step-0 checkpoint supersedes them: they are removed when it is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable

import torch

from algorithms import Algorithm
from tokenrl.run import distributed
from tokenrl.run.checkpoint import checkpoint_decision, checkpoint_path, list_checkpoints, save_checkpoint
from tokenrl.run.config import RunConfig

STAGE = "sft"


class SFTCheckpoints:
    """The checkpoint hooks :func:`tokenrl.run.selection.train_sft` calls.

    Args:
        cfg: the run config (``checkpoint_every``, ``checkpoint_seconds``, ``keep_checkpoints``).
        out_dir: the run directory.
        dist: this process's rank (rank 0 writes; every rank gathers the state, a collective under FSDP).
        loss_fn: the training wrapper of the student (DDP/FSDP or the plain loss module).
        generator: the run's batch generator.
        kept: returns what the checkpoint keeps of the run besides the SFT (``{"results": ..., "timings": ...}``).
        received: the signals :func:`tokenrl.run.checkpoint.deferred_signals` recorded.
        resume_state: an SFT checkpoint to continue from (None: the SFT starts).
    """

    def __init__(
        self,
        cfg: RunConfig,
        out_dir: str,
        dist: distributed.DistContext,
        loss_fn: torch.nn.Module,
        generator: torch.Generator,
        kept: Callable[[], dict],
        received: list[int],
        resume_state: dict | None = None,
    ):
        self.cfg, self.out_dir, self.dist, self.loss_fn, self.generator = cfg, out_dir, dist, loss_fn, generator
        self.kept, self.received, self.resume_state = kept, received, resume_state
        self.last_save = time.monotonic()

    def restore(self, sft: Algorithm) -> dict | None:
        """Load the SFT checkpoint into ``sft`` and the RNGs; returns its loop state (None without one)."""
        state = self.resume_state
        if state is None:
            return None
        distributed.load_algo_state(sft, state["algo"], self.loss_fn)
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        return state["loop"]

    def after_step(self, sft: Algorithm, steps_run: int, loop_state: Callable[[], dict]) -> None:
        """Write a checkpoint after SFT step ``steps_run`` when one is due; on SIGTERM/SIGINT write it and stop.

        Raises:
            KeyboardInterrupt: a signal arrived (after the checkpoint is written).
        """
        cfg = self.cfg
        due = (cfg.checkpoint_every and steps_run % cfg.checkpoint_every == 0) or (
            cfg.checkpoint_seconds and time.monotonic() - self.last_save >= cfg.checkpoint_seconds
        )
        write, stop = checkpoint_decision(due, self.received)
        if not write:
            return
        algo_state = distributed.algo_state(sft, self.loss_fn, self.dist)
        if self.dist.is_main:
            state = {
                "stage": STAGE, "step": 0, "sft_step": steps_run, "algo": algo_state,
                "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state(), "loop": loop_state(),
                "config": dataclasses.asdict(cfg), **self.kept(),
            }
            save_checkpoint(self.out_dir, state, steps_run, cfg.keep_checkpoints, stage=STAGE)
        self.last_save = time.monotonic()
        if stop:
            raise KeyboardInterrupt(
                f"signal {stop} at SFT step {steps_run}: checkpoint written to "
                f"{checkpoint_path(self.out_dir, steps_run, STAGE)}; rerun with resume=true to continue"
            )


def remove_sft_checkpoints(out_dir: str) -> None:
    """Delete the SFT checkpoints of ``out_dir`` (the algorithm's step-0 checkpoint holds what they led to)."""
    for _, path in list_checkpoints(out_dir, STAGE):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
