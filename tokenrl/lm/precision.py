"""How the student's forward runs: mixed precision, the attention kernel and compilation (not what it computes).

**Precision** (the run option ``precision``):

* ``fp32``: everything in the parameters' dtype (the CPU default).
* ``bf16``: the student's forward (decoder body and output head, :class:`tokenrl.lm.policy.CausalLMPolicy`)
  runs under ``torch.autocast(dtype=torch.bfloat16)``: matrix products in bfloat16, while the parameters
  (the master weights), their gradients and the AdamW moments stay float32. This is what transformers'
  Trainer and TRL do with ``bf16=True`` on Ampere and later GPUs. The loss formulas run outside the autocast
  region on logits upcast to float32 (:func:`tokenrl.core.backup.upcast`), as in fp32 runs.

The autocast wraps every training forward of the student: the SFT warm start, the algorithm's loss and the
chunked full-vocabulary passes (their recomputation in the backward included). Sampling (evaluation, the
on-policy rollouts, validation) runs in the weights' own dtype without autocast: a decode step is bound by
reading the weights and by kernel launches, not by matrix throughput, and autocast would add a weight cast
per step; the evaluation of a bf16 run is thus the evaluation of its float32 weights, comparable with fp32 runs.

**Attention**: transformers' ``sdpa`` (``torch.nn.functional.scaled_dot_product_attention``: flash or
memory-efficient kernels on a GPU, a fused kernel on CPU) for every model this project builds or loads
(:data:`ATTENTION`); transformers 5 already picks it by default for Llama, Qwen2 and GPT-2, and tokenrl asks
for it explicitly so that a version with another default does not silently fall back to eager attention.

**Compilation** (the run option ``compile``): ``torch.compile`` of the student's decoder body in the training
forward only (:func:`compiled_body`); generation keeps the eager model, whose growing KV cache would recompile.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}
"""Run option ``precision`` -> the autocast dtype of the student's training forward (None: no autocast)."""

ATTENTION = "sdpa"
"""transformers' ``attn_implementation`` of every student and teacher tokenrl builds or loads."""


def check_precision(precision: str, device: str, dtype: str) -> list[str]:
    """Problems with ``precision`` on ``device`` with parameters of ``dtype`` (empty when it can run).

    Args:
        precision: the run option (a key of :data:`PRECISIONS`).
        device: the run's torch device (``cpu``, ``cuda``, ``cuda:1``, ...).
        dtype: the student's parameter dtype name (``model.dtype``).

    Returns:
        One message per problem, each naming the key and the fix.
    """
    if precision not in PRECISIONS:
        return [f"precision={precision!r}: must be one of {sorted(PRECISIONS)}"]
    if PRECISIONS[precision] is None:
        return []
    try:
        device_type = torch.device(device).type
    except RuntimeError:
        return [f"device={device!r}: not a torch device (cpu, cuda, cuda:1, ...)"]
    problems = []
    if dtype != "float32":
        problems.append(
            f"precision={precision} with model.dtype={dtype}: mixed precision keeps float32 master weights and "
            f"optimiser state; set model.dtype=float32 (or precision=fp32 to train {dtype} weights as they are)"
        )
    if not torch.amp.is_autocast_available(device_type):
        problems.append(f"precision={precision}: torch has no autocast on device={device!r}; use precision=fp32")
    elif device_type == "cuda" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        problems.append(
            f"precision={precision}: {torch.cuda.get_device_name()} has no bfloat16 arithmetic (compute capability "
            "8.0 or later needed); use precision=fp32"
        )
    return problems


def autocast(precision: str, device_type: str) -> contextlib.AbstractContextManager:
    """The autocast context of ``precision`` on a device type (a no-op context for ``fp32``).

    Args:
        precision: a key of :data:`PRECISIONS`.
        device_type: ``cpu`` or ``cuda`` (a :class:`torch.device`'s ``type``).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: must be one of {sorted(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=device_type, dtype=dtype)


def compiled_body(body: nn.Module, backend: str = "inductor") -> Callable:
    """``torch.compile`` of a decoder body's forward, for the training forward only.

    The bound ``forward`` is compiled, not the module, so the module (its ``state_dict`` keys, checkpoints,
    ``save_pretrained``, the eager generation path) is unchanged. Shapes are dynamic from the first call
    (``dynamic=True``): batch widths change from batch to batch, and a static first compile would recompile.

    Args:
        body: the decoder body (``model.base_model``).
        backend: torch.compile's backend; ``inductor`` (generated kernels) in runs, ``aot_eager`` (the same
            graph capture and autograd, eager kernels) where a C++ or Triton compile would cost too long (tests).
    """
    return torch.compile(body.forward, dynamic=True, backend=backend)
