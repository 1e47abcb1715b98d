"""What the stages of one run share (:class:`RunContext`) and the small helpers every stage uses."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter

from tokenrl.core.divergence import DivergenceGuard
from tokenrl.data.buffer import ReplayBuffer
from tokenrl.lm.policy import CausalLMPolicy
from tokenrl.run import distributed
from tokenrl.run.config import RunConfig
from tokenrl.run.selection import BestCheckpoint
from tokenrl.tasks.base import Task


@dataclass
class RunContext:
    """What the stages of one run share."""

    cfg: RunConfig
    out_dir: str
    task: Task
    buffer: ReplayBuffer
    model: torch.nn.Module
    policy: CausalLMPolicy
    generator: torch.Generator  # batch sampling; checkpointed
    writer: SummaryWriter
    results: dict[str, Any]  # becomes metrics.json
    data_dir: str  # the offline data's folder (named by its manifest's hash)
    timings: dict[str, float]  # seconds per stage, reported under results["train"]
    guard: DivergenceGuard  # running loss / grad-norm ranges; checkpointed
    loss_fn: torch.nn.Module  # the student's LossForward, wrapped in DDP/FSDP under torchrun
    skipped_steps: int = 0  # updates refused as diverging under on_divergence=skip; checkpointed
    dist: distributed.DistContext = distributed.DistContext()  # this process's rank (a world of one by default)
    selector: BestCheckpoint | None = None  # best-validation weights of the algorithm phase (selection.every)
    corpus: ReplayBuffer | None = None  # the task's pre-training corpus, loaded when the algorithm needs_lm_batch


@contextlib.contextmanager
def timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """Record the seconds spent in the block as ``timings[key]``."""
    start = time.time()
    yield
    timings[key] = time.time() - start


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc's ``malloc_trim``; elsewhere only the
    collection), so that what a finished stage freed does not stay in the process's resident memory: glibc keeps
    freed mid-sized blocks (optimiser moments, activations) in its heap, and the next stage's peak adds to them.
    """
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def apply_threads(threads: int) -> None:
    """Set torch's intra-op threads (0 keeps torch's default)."""
    if threads:
        torch.set_num_threads(threads)


def log_scalars(writer: SummaryWriter, metrics: dict, step: int) -> None:
    """Write every finite number of ``metrics`` to TensorBoard at ``step`` (other values are skipped)."""
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and np.isfinite(v):
            writer.add_scalar(k, v, step)
