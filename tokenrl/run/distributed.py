"""Data-parallel training on torch.distributed: process group, rank helpers, batch sharding, gradient
accumulation, metric reduction and DDP/FSDP wrapping of the student.

A run launched by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) joins the process group that torchrun
describes (nccl on GPU, gloo on CPU); a plain ``python`` run is a world of one and none of this touches it.

Batches. The config names the global batch (``batch_size``) and the micro-batch (``micro_batch_size``,
default ``batch_size / world_size``); the gradient-accumulation steps follow,
``accumulation = batch_size / (world_size * micro_batch_size)``. Every rank draws the same global row list
from the shared seeded generator (the algorithm's sampler, :mod:`tokenrl.data.samplers`), then keeps its part
of it (:func:`local_micro_batches`): rank ``r``'s micro-step ``m`` is the slice
``[(r * accumulation + m) * micro, ... + micro)``. The micro-batches of one step are therefore the same for any
world size with the same micro-batch size, and the ranks' samples are disjoint parts of one draw.

Loss scaling. Every loss is a token-weighted mean over its micro-batch. Micro-batch ``i`` (on any rank) is
scaled by ``n_i / N`` (its valid response tokens over the global batch's, an all-reduced count), times the
world size because DDP averages gradients over ranks. The accumulated gradient is then the gradient of
``sum_i (n_i / N) * loss_i``: exactly the full-batch gradient for losses that are a mean over the valid
response tokens (bc, kd, the LM terms), and the token-count-weighted mean of the micro-batch gradients for
losses whose terms average over other masks (iql_bd's in-set terms, soft_q's known-reward mask). A
single-process run with one micro-batch is not scaled at all and is exactly the unsharded run. The update that
applies these weights is :func:`tokenrl.run.step.optimizer_update`.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard

from tokenrl.core.ranks import launched_by_torchrun
from tokenrl.data.buffer import Batch

STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the data-parallel world (a world of one without torchrun).

    Attributes:
        rank: global rank.
        world_size: number of processes.
        local_rank: rank on this node (the GPU index under nccl).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """True when running under torchrun with more than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only rank that writes outputs and evaluates."""
        return self.rank == 0



@contextlib.contextmanager
def process_group(device: str, timeout_min: float = 60.0) -> Iterator[tuple[DistContext, str]]:
    """Join the process group of the torchrun environment for the block, or stay a world of one.

    Under torchrun the group is created (nccl on GPU, gloo on CPU) unless one exists already, and destroyed
    at the end if it was created here.

    Args:
        device: the configured device (``cpu``, ``cuda``); under nccl each rank takes ``cuda:<local_rank>``.
        timeout_min: collective timeout in minutes (ranks wait this long while rank 0 evaluates).

    Yields:
        ``(context, device)``: this process's place in the world and the device it should use.
    """
    if not launched_by_torchrun():
        yield DistContext(), device
        return
    ctx = DistContext(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    on_gpu = device.startswith("cuda")
    if on_gpu:
        device = f"cuda:{ctx.local_rank}"
        torch.cuda.set_device(device)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if on_gpu else "gloo", timeout=datetime.timedelta(minutes=timeout_min))
    try:
        yield ctx, device
        if created:
            # Leave together: a rank that tears gloo down while a peer is still evaluating or saving makes the
            # peer's transport thread abort the process at exit ("terminate called without an active exception").
            dist.barrier()
    finally:
        if created:
            dist.destroy_process_group()



def broadcast_object(obj, src: int = 0):
    """``obj`` of rank ``src`` on every rank (picklable objects; identity without a process group)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# --------------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------------
def accumulation_steps(batch_size: int, micro_batch_size: int | None, world_size: int) -> tuple[int, int]:
    """``(micro_batch_size, accumulation_steps)`` for a global batch on ``world_size`` ranks.

    Raises:
        ValueError: the global batch is not ``world_size * micro_batch_size * accumulation`` for an integer
            accumulation (the message names the keys to change).
    """
    micro = micro_batch_size or batch_size // world_size
    if micro <= 0 or batch_size % (world_size * micro):
        raise ValueError(
            f"batch_size={batch_size} must be a multiple of world_size ({world_size}) x micro_batch_size "
            f"({micro_batch_size if micro_batch_size else 'default batch_size / world_size'}); "
            "change batch_size or micro_batch_size"
        )
    return micro, batch_size // (world_size * micro)


def local_micro_batches(indices: list[int], ctx: DistContext, micro_batch_size: int) -> list[list[int]]:
    """This rank's micro-batches of a global index list: rank-major, then micro-step (see the module doc)."""
    per_rank = len(indices) // ctx.world_size
    mine = indices[ctx.rank * per_rank : (ctx.rank + 1) * per_rank]
    return [mine[i : i + micro_batch_size] for i in range(0, per_rank, micro_batch_size)]


def all_reduce_sum(values: list[float]) -> list[float]:
    """Elementwise sum of ``values`` over ranks (float64; identity without a process group)."""
    if not dist.is_initialized():
        return values
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=device)  # nccl reduces GPU tensors only
    dist.all_reduce(t)
    return t.tolist()


def reduce_stats(per_micro: list[dict[str, float]], weights: list[float]) -> dict[str, float]:
    """Weighted sum of every rank's micro-batch stats (the weights of all ranks' micro-batches sum to 1).

    Every rank must pass stats with the same keys (the same algorithm).
    """
    keys = list(per_micro[0])
    local = [sum(w * s[k] for s, w in zip(per_micro, weights)) for k in keys]
    return dict(zip(keys, all_reduce_sum(local)))


# --------------------------------------------------------------------------------------------------
# The student
# --------------------------------------------------------------------------------------------------
class LossForward(nn.Module):
    """An algorithm's loss as the ``forward`` of a module that holds the student, so that DDP/FSDP hook it.

    The algorithms reach into the student through the policy's heads (``state_hidden``, ``sparse_logits``),
    not through one ``forward``; DDP only synchronises the gradients of a backward that follows its own
    ``forward``. Wrapping this module (whose only parameters are the policy's) once per run gives that
    forward, which takes the algorithm being trained as an argument (the SFT warm start, then the algorithm), so
    one DDP instance serves both.

    Args:
        policy: the student policy (its parameters are this module's parameters).
    """

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy

    def forward(self, algo, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """``algo.compute_loss(batch)``: the scalar loss and its stats (``algo`` trains this module's policy)."""
        return algo.compute_loss(batch)


def wrap_for_training(module: LossForward, ctx: DistContext, strategy: str) -> nn.Module:
    """The module whose forward computes a micro-batch's loss: ``module`` itself, or DDP/FSDP2 around it.

    Args:
        module: the loss module of the student policy (the frozen teacher is never wrapped).
        ctx: the data-parallel context (a world of one returns ``module`` unchanged).
        strategy: ``ddp`` (replicated student) or ``fsdp`` (``fully_shard``, parameters sharded over ranks).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"dist.strategy must be one of {STRATEGIES}, got {strategy!r}")
    if not ctx.enabled:
        return module
    if strategy == "ddp":
        device = next(module.parameters()).device
        return nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    # One FSDP group at the root: the policy's heads read parameters (the output embedding) outside any
    # submodule's forward, which per-block groups would leave sharded there. Gradients and optimiser state
    # are sharded; parameters are gathered for the duration of each micro-batch's forward and backward.
    fully_shard(module)
    return module


def is_fsdp(loss_fn: nn.Module) -> bool:
    """Whether the training module is sharded with FSDP2 (its parameters are DTensors)."""
    return isinstance(loss_fn, FSDPModule)


@contextlib.contextmanager
def full_parameters(loss_fn: nn.Module) -> Iterator[None]:
    """Gather the student's full parameters for the block (evaluation, saving); a no-op unless FSDP.

    Every rank must enter the block (the gather is a collective); inside it the student is a plain module.
    """
    if not is_fsdp(loss_fn):
        yield
        return
    loss_fn.unshard()
    try:
        yield
    finally:
        loss_fn.reshard()


def plain_copy(model: nn.Module, loss_fn: nn.Module) -> nn.Module:
    """``model`` itself, or under FSDP (inside :func:`full_parameters`) a copy with its own storage to save.

    FSDP's gathered parameters are views into its all-gather buffers, which the safetensors writer cannot read.
    """
    return copy.deepcopy(model) if is_fsdp(loss_fn) else model


def algo_state(algo, loss_fn: nn.Module, ctx: DistContext) -> dict | None:
    """``algo.state_dict()`` with full (unsharded) tensors on rank 0, None on the other ranks.

    Under FSDP the student and optimiser state are gathered with torch.distributed.checkpoint's
    full-state-dict API (a collective: every rank calls this) and stored in the single-process format, so
    the checkpoint resumes on any number of processes and with either strategy.
    """
    if not is_fsdp(loss_fn):
        return algo.state_dict() if ctx.is_main else None
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(loss_fn, options=options)
    fresh = not algo.optimizer.state  # before the first update (the algorithm's step-0 checkpoint)
    optim_state = get_optimizer_state_dict(loss_fn, algo.optimizer, options=options)
    if fresh:
        # torch fills an empty optimiser state with a zero-lr step first; AdamW would count it as its first step
        # (bias correction) and this run would no longer update as one process does: drop it again.
        algo.optimizer.state.clear()
        optim_state = {**optim_state, "state": {}}
    if not ctx.is_main:
        return None
    state = {k: v for k, v in algo.state_dict().items() if k not in ("policy", "optimizer")}
    state["policy"] = {k.removeprefix("policy."): v for k, v in model_state.items()}
    order = {name: i for i, name in enumerate(n for g in optim_state["param_groups"] for n in g["params"])}
    state["optimizer"] = {
        "state": {order[name]: value for name, value in optim_state["state"].items()},
        "param_groups": [{**g, "params": [order[n] for n in g["params"]]} for g in optim_state["param_groups"]],
    }
    return state


def load_algo_state(algo, state: dict, loss_fn: nn.Module) -> None:
    """Restore :func:`algo_state`'s dict (or a plain ``algo.state_dict()``) into ``algo`` on every rank."""
    if not is_fsdp(loss_fn):
        algo.load_state_dict(state)
        return
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(loss_fn, {f"policy.{k}": v for k, v in state["policy"].items()}, options=options)
    names = [n for n, p in loss_fn.named_parameters() if p.requires_grad]
    optim = state["optimizer"]
    set_optimizer_state_dict(
        loss_fn,
        algo.optimizer,
        {
            "state": {names[i]: value for i, value in optim["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in optim["param_groups"]],
        },
        options=options,
    )
    if not optim["state"]:  # a checkpoint before the first update: torch's loading filled the state (see algo_state)
        algo.optimizer.state.clear()
    algo.scheduler.load_state_dict(state["scheduler"])
    algo.step = int(state["step"])


class NullWriter:
    """Stands in for the TensorBoard writer on ranks other than 0 (they write nothing)."""

    def add_scalar(self, *args, **kwargs) -> None:
        """Drop the scalar."""

    def close(self) -> None:
        """Nothing to close."""
