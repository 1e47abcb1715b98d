"""Where this process sits in a torchrun world, readable from any layer (data generation waits on it too).

The process group itself, batch sharding and DDP/FSDP are in :mod:`tokenrl.run.distributed`.
"""

from __future__ import annotations

import os

import torch.distributed as dist


def launched_by_torchrun() -> bool:
    """Whether the environment describes a torch.distributed world of more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def env_rank() -> int:
    """This process's rank from the torchrun environment (0 without torchrun); usable before :func:`init`."""
    return int(os.environ.get("RANK", "0"))


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if dist.is_initialized():
        dist.barrier()
