"""A run directory belongs to one run: an owner record, a lock, and refusals that name the fix.

* ``owner.json`` records which run the directory holds: the SHA-256 of the run's identity (its config without
  the keys a resume may change, :func:`tokenrl.run.checkpoint.run_identity`, the same comparison resume makes),
  the config itself, the command, and one entry per resume (``resumes``: from which step, which settings changed).
* ``.owner.lock`` is held (``fcntl.flock``) by the process that writes the directory, from before it looks at the
  directory until it exits; the kernel releases it when that process ends, however it ends, so the lock of a
  dead process is never in the way. The file holds the holder's pid and host, named when another process is refused.

:func:`locked_run_dir` takes the lock, :func:`check_owner` refuses a directory that holds another run (or this
run's outputs without ``resume=true``), and :func:`claim_run_dir` writes the owner record and ``config.yaml`` of a
new run. A refused run writes nothing in the directory but the lock file (an empty file, created if missing);
only after every check passes is anything else written.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from typing import Any

from omegaconf import OmegaConf

from tokenrl.core.files import read_json
from tokenrl.data.buffer import write_json_atomic
from tokenrl.run.checkpoint import check_resume_config, identity_differences, identity_digest

log = logging.getLogger(__name__)

OWNER_FILE = "owner.json"
LOCK_FILE = ".owner.lock"
CONFIG_FILE = "config.yaml"
RUN_OUTPUTS = ("checkpoints", "metrics.json", "student.safetensors", "student")
"""What a run leaves that another run must not mix with (TensorBoard's ``tb/`` of a run that left none of these
is removed when a run starts in the directory)."""


class RunDirError(RuntimeError):
    """The run directory holds another run, this run's outputs without ``resume=true``, or is in use."""


def owner_path(out_dir: str) -> str:
    """The owner record of the run directory ``out_dir``."""
    return os.path.join(out_dir, OWNER_FILE)


def run_outputs(out_dir: str) -> list[str]:
    """The entries of :data:`RUN_OUTPUTS` present in ``out_dir``."""
    return [name for name in RUN_OUTPUTS if os.path.exists(os.path.join(out_dir, name))]


def read_owner(out_dir: str) -> dict | None:
    """The owner record of ``out_dir`` (None when there is none).

    Raises:
        RunDirError: the record cannot be read (naming it and the fix).
    """
    path = owner_path(out_dir)

    def damaged(reason: object) -> RunDirError:
        return RunDirError(
            f"{path} is damaged ({reason}): it records which run {out_dir} holds; restore it, or choose another "
            "output directory (hydra.run.dir=...)"
        )

    owner = read_json(path, damaged)
    if owner is not None and (
        not isinstance(owner.get("identity_sha256"), str) or not isinstance(owner.get("config"), dict)
    ):
        raise damaged("no identity_sha256 or config")
    return owner


# --------------------------------------------------------------------------------------------------
# The lock
# --------------------------------------------------------------------------------------------------
def _holder(path: str) -> str:
    with contextlib.suppress(OSError):
        with open(path) as f:
            text = f.read().split()
        if len(text) >= 2:
            return f"pid {text[0]} on {text[1]}"
    return "another process"


@contextlib.contextmanager
def locked_run_dir(out_dir: str, create: bool) -> Iterator[int | None]:
    """Hold the run directory's lock for the block; yields the lock file's descriptor.

    Args:
        out_dir: the run directory.
        create: create ``out_dir`` if it is missing (a new run); otherwise a missing directory yields None and
            locks nothing (the caller refuses it).

    Raises:
        RunDirError: another process holds the lock (its pid and host are named).
    """
    if not os.path.isdir(out_dir):
        if not create:
            yield None
            return
        os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise RunDirError(
                f"{out_dir} is in use by {_holder(path)} (it holds {path}): two processes must not write one run "
                "directory; wait for that run to end, or choose another output directory (hydra.run.dir=...)"
            ) from None
        yield fd
    finally:
        os.close(fd)  # releases the lock


def note_lock_holder(fd: int | None) -> None:
    """Write this process's pid and host into the lock file (named when another process is refused)."""
    if fd is not None:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)


# --------------------------------------------------------------------------------------------------
# Ownership
# --------------------------------------------------------------------------------------------------
def check_owner(out_dir: str, config: dict, resume: bool) -> dict | None:
    """Refuse ``out_dir`` when it holds another run, or this run's outputs and ``resume`` is off.

    Args:
        out_dir: the run directory (locked by the caller).
        config: ``dataclasses.asdict`` of the run config.
        resume: whether the run asks to continue the directory's run.

    Returns:
        The owner record (None when the directory has none: new, or written before owner records).

    Raises:
        RunDirError: naming what the directory holds and the fix.
    """
    owner = read_owner(out_dir) if os.path.isdir(out_dir) else None
    outputs = run_outputs(out_dir) if os.path.isdir(out_dir) else []
    same = owner is not None and owner["identity_sha256"] == identity_digest(config)
    if owner is not None and not same and resume:
        check_resume_config(owner["config"], config, owner_path(out_dir), label="recorded")
    if owner is not None and not same and (outputs or resume):
        diffs = identity_differences(owner["config"], config)
        # The algorithm's name first, then keys both configs have (not the fields of one algorithm's config only).
        diffs.sort(key=lambda d: (d[0] not in ("algo.name", "algo.preset"), d[1] is None or d[2] is None, d[0]))
        detail = ", ".join(f"{k}: {a!r} there vs {b!r} here" for k, a, b in diffs[:6])
        detail += f" and {len(diffs) - 6} more" if len(diffs) > 6 else ""
        raise RunDirError(
            f"{out_dir} belongs to another run ({owner_path(out_dir)}; the configs differ in {detail or 'its hash'}): "
            "choose another output directory (hydra.run.dir=...) for this run"
        )
    if outputs and not resume:
        what = "this run's" if same else "another run's"
        fix = (
            "add resume=true to continue it (a finished run then only reports that it is done)"
            if same
            else "it has no owner record (written by an older version or by hand), so it cannot be resumed as this run"
        )
        raise RunDirError(
            f"{out_dir} already holds {what} outputs ({', '.join(outputs)}); {fix}, or choose another output "
            "directory (hydra.run.dir=...) for a new run"
        )
    return owner


def claim_run_dir(out_dir: str, config: dict, fd: int | None) -> None:
    """Make ``out_dir`` the directory of a new run: the lock names this process, the owner record and
    ``config.yaml`` are written, and the ``tb/`` of an earlier attempt that left no outputs is removed."""
    note_lock_holder(fd)
    stale_tb = os.path.join(out_dir, "tb")
    if os.path.isdir(stale_tb):
        log.warning("removing %s: TensorBoard events of an earlier attempt that left no checkpoint", stale_tb)
        shutil.rmtree(stale_tb)
    record = {
        "identity_sha256": identity_digest(config),
        "config": config,
        "command": sys.argv,
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "resumes": [],
    }
    write_json_atomic(owner_path(out_dir), record)
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        f.write(OmegaConf.to_yaml(OmegaConf.create(config)))


def record_resume(out_dir: str, config: dict, fd: int | None, entry: dict[str, Any]) -> None:
    """Note a resume in the owner record (``resumes``), written before the resumed run writes anything else.

    A directory of a run from before owner records gets its record here (its checkpoint's config was checked).
    """
    note_lock_holder(fd)
    owner = read_owner(out_dir) or {
        "identity_sha256": identity_digest(config), "config": config, "command": None, "resumes": [],
    }
    entry = {**entry, "command": sys.argv, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    owner["resumes"] = [*owner.get("resumes", []), entry]
    write_json_atomic(owner_path(out_dir), owner)
