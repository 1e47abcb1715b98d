"""Train-state checkpoints: written atomically, verified on load, the last k kept, and resume that checks its config.

A checkpoint is one safetensors file ``<out_dir>/checkpoints/step-XXXXXXXX.safetensors`` (the SFT warm start's:
``sft-XXXXXXXX.safetensors``): the tensors of the state (model, optimiser moments, RNG states) as safetensors
tensors, everything else as JSON in the file's metadata, and a SHA-256 over both. Nothing is unpickled, so a damaged or foreign file cannot run code; it
fails verification instead, and :func:`load_latest` falls back to the previous checkpoint with a warning.

:func:`check_resume_config` refuses to continue a run under a different config: only the keys of
:data:`RESUME_MAY_CHANGE` may differ from the checkpoint's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tokenrl.core.files import publish
from tokenrl.run.distributed import all_reduce_sum

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_FORMAT = "tokenrl-checkpoint-v1"
WRITE_DELAY_ENV = "TOKENRL_CHECKPOINT_WRITE_DELAY_S"
"""Fault-injection hook for the kill tests: seconds to sleep between writing a checkpoint and committing it."""

RESUME_MAY_CHANGE = frozenset(
    {"steps", "progress", "threads", "device", "precision", "compile", "resume", "log_every", "checkpoint_every",
     "checkpoint_seconds", "keep_checkpoints", "dist"}
)
"""Config keys a resumed run may change: the length of the run and how it is executed, watched and saved."""

RESUME_MAY_ADJUST = frozenset({"algo.lr", "algo.grad_clip", "on_divergence", "divergence_factor", "max_skipped_fraction"})
"""Training settings a resumed run may also change: the fixes a divergence stop suggests. They change the
result, so every change is recorded (``resumes`` in ``metrics.json``)."""

STAGES = ("step", "sft")
"""Checkpoint file prefixes: ``step`` the algorithm's updates, ``sft`` the SFT warm start's."""


class CheckpointError(RuntimeError):
    """No checkpoint can be used: none where expected, or every one fails verification."""


class ResumeError(ValueError):
    """``resume=true`` asked to continue a run under a config that differs from the checkpoint's."""


def checkpoint_dir(out_dir: str) -> str:
    """Where the checkpoints of the run in ``out_dir`` live."""
    return os.path.join(out_dir, CHECKPOINT_DIR)


def checkpoint_path(out_dir: str, step: int, stage: str = "step") -> str:
    """The checkpoint file of ``step`` of ``stage`` (:data:`STAGES`; the one place that names checkpoints)."""
    return os.path.join(checkpoint_dir(out_dir), f"{stage}-{step:08d}.safetensors")


def list_checkpoints(out_dir: str, stage: str = "step") -> list[tuple[int, str]]:
    """``(step, path)`` of every checkpoint file of ``stage`` in ``out_dir``, newest first."""
    directory = checkpoint_dir(out_dir)
    pattern = re.compile(rf"^{stage}-(\d{{8}})\.safetensors$")
    found = []
    for name in os.listdir(directory) if os.path.isdir(directory) else []:
        match = pattern.match(name)
        if match:
            found.append((int(match.group(1)), os.path.join(directory, name)))
    return sorted(found, reverse=True)


# --------------------------------------------------------------------------------------------------
# Encoding: nested state -> (JSON tree, flat tensors)
# --------------------------------------------------------------------------------------------------
def _encode(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    """JSON tree of ``obj`` with each tensor replaced by ``{"__tensor__": key}`` and stored in ``tensors``.

    Dicts with non-string keys (optimiser state is keyed by parameter index) and tuples keep their types.
    """
    if torch.is_tensor(obj):
        tensors[path] = obj.detach()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        return {"__items__": [[k, _encode(v, tensors, f"{path}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"checkpoint state {path} is a {type(obj).__name__}; only tensors and JSON values can be saved")


def _decode(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, dict):
        if "__tensor__" in tree:
            return tensors[tree["__tensor__"]]
        if "__items__" in tree:
            return {k: _decode(v, tensors) for k, v in tree["__items__"]}
        if "__tuple__" in tree:
            return tuple(_decode(v, tensors) for v in tree["__tuple__"])
        return {k: _decode(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_decode(v, tensors) for v in tree]
    return tree


def _writable(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` as safetensors can write them, copying only where it must.

    safetensors writes a tensor straight from its memory when it is a contiguous CPU tensor that spans its whole
    storage; it refuses tensors that share storage (tied embeddings) and views of a larger storage. Copying
    every tensor instead would hold a second copy of the student and its optimiser moments while the
    checkpoint is written (+0.8 GB for the SmolLM2 student).
    """
    seen: set[int] = set()
    out = {}
    for name in sorted(tensors):
        tensor = tensors[name]
        storage = tensor.untyped_storage()
        whole = tensor.device.type == "cpu" and tensor.is_contiguous() and tensor.storage_offset() == 0
        whole = whole and storage.nbytes() == tensor.numel() * tensor.element_size()
        if not whole or storage.data_ptr() in seen:
            tensor = tensor.to("cpu", copy=True).contiguous()
        seen.add(tensor.untyped_storage().data_ptr())
        out[name] = tensor
    return out


def _digest(state_json: str, tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the JSON part and every tensor's name, dtype, shape and bytes (sorted by name)."""
    digest = hashlib.sha256(state_json.encode())
    for name in sorted(tensors):
        tensor = tensors[name]
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # the tensor's own bytes, no copy
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------------------
def write_state_file(path: str, state: dict) -> None:
    """Write ``state`` to ``path`` as one verified safetensors file, atomically (a temporary file renamed into
    place, readable as the umask says).

    Args:
        path: the file.
        state: nested dicts/lists/tuples of tensors and JSON values.
    """
    tensors: dict[str, torch.Tensor] = {}
    state_json = json.dumps(_encode(state, tensors, "state"), sort_keys=True)
    tensors = _writable(tensors)
    metadata = {"format": CHECKPOINT_FORMAT, "state": state_json, "sha256": _digest(state_json, tensors)}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file(tensors, tmp, metadata=metadata)
    delay = float(os.environ.get(WRITE_DELAY_ENV, 0) or 0)
    if delay:
        time.sleep(delay)
    publish(tmp, path)


def read_state_file(path: str) -> dict:
    """Read and verify a file of :func:`write_state_file`.

    Raises:
        ValueError: the file cannot be parsed, is of another format, or its checksum does not match (the
            caller names the file and the fix).
    """
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"format {metadata.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
    tensors = load_file(path)
    if _digest(metadata["state"], tensors) != metadata["sha256"]:
        raise ValueError("its SHA-256 does not match the one recorded in it (the file was changed or damaged)")
    return _decode(json.loads(metadata["state"]), tensors)


def is_state_file(path: str) -> bool:
    """Whether ``path`` is a file of :func:`write_state_file` (a checkpoint or a cached SFT start), not plain weights."""
    with safe_open(path, framework="pt") as f:
        return (f.metadata() or {}).get("format") == CHECKPOINT_FORMAT


def save_checkpoint(
    out_dir: str, state: dict, step: int, keep: int, protect: int | None = None, stage: str = "step"
) -> str:
    """Write ``state`` as the checkpoint of ``step`` atomically, then delete all but the newest ``keep`` (of its stage).

    Args:
        out_dir: the run directory.
        state: nested dicts/lists/tuples of tensors and JSON values.
        step: the number of updates done (names the file).
        keep: checkpoints kept (>= 1).
        protect: if given, the newest checkpoint at or before this step is kept too (the last good state
            before the first update the divergence guard skipped, :mod:`tokenrl.run.recovery`).
        stage: the file prefix (:data:`STAGES`).

    Returns:
        The checkpoint's path.
    """
    path = checkpoint_path(out_dir, step, stage)
    write_state_file(path, state)
    found = list_checkpoints(out_dir, stage)
    protected = next((p for s, p in found if s <= protect), None) if protect is not None else None
    for _, old in found[keep:]:
        if old != protected:
            with contextlib.suppress(FileNotFoundError):
                os.remove(old)
    return path


def no_checkpoint_message(out_dir: str) -> str:
    """The refusal of ``resume=true`` where no run was started."""
    return (
        f"resume=true but there is no checkpoint in {checkpoint_dir(out_dir)}: pass the directory of the "
        "interrupted run (hydra.run.dir=<its output dir>), or drop resume=true to start a new run"
    )


def load_checkpoint(path: str) -> dict:
    """Read and verify one checkpoint file.

    Raises:
        CheckpointError: the file cannot be parsed or its checksum does not match (naming the file).
    """
    try:
        return read_state_file(path)
    except Exception as error:  # any failure to read back what was written is damage
        raise CheckpointError(f"checkpoint {path} fails verification: {error}") from error


def load_latest(out_dir: str, stage: str = "step") -> tuple[dict, str] | None:
    """The newest checkpoint of ``stage`` in ``out_dir`` that passes verification: ``(state, path)``, None without any.

    A damaged newer checkpoint is renamed to ``*.damaged`` (kept for inspection) with a warning, and the
    next older one is tried.

    Raises:
        CheckpointError: checkpoints exist but none passes verification.
    """
    failures = []
    for _, path in list_checkpoints(out_dir, stage):
        try:
            return load_checkpoint(path), path
        except CheckpointError as error:
            failures.append(str(error))
            os.replace(path, f"{path}.damaged")
            warnings.warn(
                f"{error}; renamed it to {os.path.basename(path)}.damaged and trying the previous checkpoint", stacklevel=2
            )
    if failures:
        raise CheckpointError(
            "no usable checkpoint: " + "; ".join(failures) + "; delete the run directory and start again"
        )
    return None


# --------------------------------------------------------------------------------------------------
# Resume checks
# --------------------------------------------------------------------------------------------------
def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def _may_change(key: str) -> bool:
    """Whether a resume may change the flattened config key ``key``."""
    return key.split(".")[0] in RESUME_MAY_CHANGE or key in RESUME_MAY_ADJUST


def run_identity(config: dict) -> dict[str, Any]:
    """The flattened config (dotted keys) without the keys a resume may change: two configs with the same
    identity are the same run (the run directory's owner record and resume compare exactly this)."""
    return {k: v for k, v in _flatten(json.loads(json.dumps(config))).items() if not _may_change(k)}


def identity_digest(config: dict) -> str:
    """SHA-256 of :func:`run_identity`, the hash a run directory's owner record holds."""
    return hashlib.sha256(json.dumps(run_identity(config), sort_keys=True).encode()).hexdigest()


def identity_differences(stored: dict, requested: dict) -> list[tuple[str, Any, Any]]:
    """``(key, stored value, requested value)`` for every key in which the two configs' identities differ."""
    old, new = run_identity(stored), run_identity(requested)
    return [(k, old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]


def adjusted_settings(stored: dict, requested: dict) -> dict[str, list]:
    """The training settings a resume changes (``steps`` and :data:`RESUME_MAY_ADJUST`): key -> ``[old, new]``."""
    old, new = _flatten(json.loads(json.dumps(stored))), _flatten(json.loads(json.dumps(requested)))
    keys = sorted(RESUME_MAY_ADJUST | {"steps"})
    return {k: [old.get(k), new.get(k)] for k in keys if old.get(k) != new.get(k)}


def check_resume_config(stored: dict, requested: dict, where: str, label: str = "checkpoint") -> None:
    """Refuse to resume when the configs differ outside :data:`RESUME_MAY_CHANGE` and :data:`RESUME_MAY_ADJUST`.

    Args:
        stored: the ``dataclasses.asdict`` of the run config in the checkpoint (or the run directory's owner record).
        requested: the same of the config asked to resume.
        where: the file the stored config comes from (named in the error).
        label: what that file is, in the error (``checkpoint``, ``recorded``).

    Raises:
        ResumeError: naming every differing key with both values.
    """
    diffs = identity_differences(stored, requested)
    if diffs:
        detail = ", ".join(f"{k}: {label} {a!r} vs requested {b!r}" for k, a, b in diffs)
        allowed = sorted(RESUME_MAY_CHANGE | RESUME_MAY_ADJUST)
        raise ResumeError(
            f"resume=true with a config that differs from the run's, in {where} ({detail}); resume with the "
            f"run's values (only {allowed} may change), or start a new run in another output directory"
        )


def checkpoint_decision(due: bool, received: list[int]) -> tuple[bool, str | None]:
    """``(write, stop)`` after an update: write a checkpoint when one is due or a signal arrived; ``stop`` names the
    signal (None: go on).

    Under torchrun every rank takes any rank's decision (one all-reduce of two numbers): a time-based checkpoint
    and a signal may come to the ranks at different updates, while writing gathers the state from every rank
    (a collective under FSDP) and the ranks must stop together.
    """
    due_any, signalled = all_reduce_sum([float(bool(due)), float(bool(received))])
    if not signalled:
        return bool(due_any), None
    return True, signal.Signals(received[0]).name if received else "SIGTERM/SIGINT (on another rank)"


@contextlib.contextmanager
def deferred_signals(signals: tuple[int, ...]) -> Iterator[list[int]]:
    """Within the block, SIGTERM/SIGINT are recorded in the yielded list instead of stopping the process.

    The training loop checks the list after each update, saves a checkpoint and exits by raising
    ``KeyboardInterrupt``. A signal the block did not act on (it ended otherwise: e.g. the warm start read its
    cache, or a run failed, after the signal came) is not lost: once the previous handlers are back, the first
    one is delivered again to them (the default ends the process; an enclosing block records it). Outside the
    main thread (where handlers cannot be installed) the signals keep their default behaviour, and a signal the
    process ignores (``SIG_IGN``: e.g. SIGINT of a job a non-interactive shell put in the background) stays ignored.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {
        sig: signal.signal(sig, lambda signum, frame: received.append(signum))
        for sig in signals if signal.getsignal(sig) is not signal.SIG_IGN
    }
    acted = False
    try:
        yield received
    except KeyboardInterrupt:
        acted = True
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if received and not acted:
            signal.raise_signal(received[0])
