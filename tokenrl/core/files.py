"""Files with the permissions the user's umask asks for, also when they are written through a temporary file.

safetensors creates its files with mode 0600 and ``tempfile.mkdtemp`` its folders with 0700, whatever the
umask, so shards, checkpoints and weights written that way cannot be read by the other users of a shared file
system even when the umask lets them. :func:`publish` gives a finished temporary file the mode an ordinary
``open`` would have given it (0666 without the umask's bits) and renames it into place;
:func:`apply_umask_to_tree` does the same for a folder written by a library. :func:`read_json` reads the
records a run or a dataset keeps beside its files, refusing a damaged one with the caller's error.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any


def current_umask() -> int:
    """The process's umask, read from ``/proc/self/status`` where it is there (reading it with ``os.umask``
    means setting it for a moment, which a thread creating a file at that moment would see)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publish(tmp: str, path: str) -> None:
    """Give the finished file ``tmp`` the umask's mode and rename it to ``path`` (atomic on one file system)."""
    os.chmod(tmp, 0o666 & ~current_umask())
    os.replace(tmp, path)


def apply_umask_to_tree(root: str) -> None:
    """Give ``root`` and every folder and file under it the mode the umask asks for (0777 / 0666 without its bits)."""
    mask = current_umask()
    os.chmod(root, 0o777 & ~mask)
    for base, folders, files in os.walk(root):
        for name in folders:
            os.chmod(os.path.join(base, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(base, name), 0o666 & ~mask)


def read_json(
    path: str, damaged: Callable[[Exception], Exception], catch: tuple[type[Exception], ...] = (OSError, ValueError)
) -> Any:
    """The JSON value stored at ``path``, None when there is no such file.

    Raises:
        The exception ``damaged(error)`` (which names the file and the fix) when reading or parsing the file raises
        one of ``catch``.
    """
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except catch as error:
        raise damaged(error) from None
