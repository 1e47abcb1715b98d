"""The offline dataset's manifest and its integrity checks: what the data folder name hashes, and the checksums.

``manifest.json`` records every setting that changes the data (:func:`data_manifest`) and the SHA-256 of each
shard; every load compares it with the requested settings (a mismatch names the field) and every shard with
its checksum (a damaged shard is named, with the fix). Written and read by :mod:`tokenrl.tasks.datagen`.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from typing import Sequence

from tokenrl.core.files import read_json
from tokenrl.data.buffer import ReplayBuffer, manifest_path

DATA_FORMAT = 3
"""Version of the dataset layout and content (manifest fields, shard format); part of every manifest.

3: the top-p sets of a :class:`TopPCachingSampler` come from the sampling pass (KV-cached logits), not from a
second teacher-forced pass; equal to float rounding, but the float16 log-probs (and at a tie on the top-p
boundary, a set) can differ in the last bit, so shards are not byte-identical to format 2's.
"""

_NOT_COMPARED = ("shards",)  # manifest entries that describe the files, not the settings


class DataIntegrityError(ValueError):
    """A dataset file is damaged or does not match its manifest; the message names the file and the fix."""


def data_manifest(
    manifest: dict,
    prompts: Sequence[Sequence[int]],
    *,
    samples_per_prompt: int,
    cache_top_p: float,
    shard_prompts: int,
    seed: int,
) -> dict:
    """Every setting that changes the data: the task's ``manifest`` plus the counts, p, seed and layout.

    Args:
        manifest: the task's settings (teacher, tokenizer, sampling p and temperature, max tokens, ...).
        prompts: the training prompts; their count and a hash of their token ids (which covers the prompt
            file, the split and the tokenizer) are recorded.
        samples_per_prompt, cache_top_p, shard_prompts, seed: as in :func:`generate_teacher_data`.

    Returns:
        A JSON-normalised dict (tuples as lists), as it is stored in ``manifest.json`` without ``shards``.
    """
    full = dict(manifest)
    full.update(
        {
            "format": DATA_FORMAT,
            "n_prompts": len(prompts),
            "prompts_sha256": hashlib.sha256(json.dumps([[int(t) for t in p] for p in prompts]).encode()).hexdigest(),
            "samples_per_prompt": samples_per_prompt,
            "cache_top_p": cache_top_p,
            "shard_prompts": shard_prompts,
            "n_shards": (len(prompts) + shard_prompts - 1) // shard_prompts,
            "seed": seed,
        }
    )
    return json.loads(json.dumps(full, default=str))


def dataset_dir(root: str, name: str, manifest: dict) -> str:
    """The folder of the dataset ``manifest`` (see :func:`data_manifest`) under ``root``: ``<name>-<hash>``."""
    blob = json.dumps(manifest, sort_keys=True, default=str).encode()
    return os.path.join(root, f"{name}-{hashlib.sha1(blob).hexdigest()[:10]}")


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

def record_checksum(stored: dict, out_dir: str, path: str) -> None:
    """Put ``path``'s SHA-256 into the manifest dict ``stored`` (warning when it replaces a different one)."""
    name, digest = os.path.basename(path), file_sha256(path)
    checksums = stored["shards"]
    if name in checksums and checksums[name] != digest:
        warnings.warn(
            f"regenerated {path} differs from the checksum recorded when it was first written (a teacher "
            "that is not bit-reproducible on this device?); recording the new checksum",
            stacklevel=3,
        )
    checksums[name] = digest

def _regenerate_hint(path: str) -> str:
    return (
        f"delete {path} and rerun experiments/generate.py (or the training run) with the same settings: "
        "generation resumes per shard and rewrites only the missing ones"
    )


def read_manifest(out_dir: str) -> dict | None:
    """The stored manifest of ``out_dir`` (None when there is none), refused when damaged or of another format."""
    path = manifest_path(out_dir)
    stored = read_json(
        path,
        lambda error: DataIntegrityError(
            f"dataset manifest {path} is damaged ({error}); delete the folder {out_dir} and regenerate the data"
        ),
        catch=(json.JSONDecodeError, UnicodeDecodeError),
    )
    if stored is None:
        return None
    if not isinstance(stored, dict) or "n_shards" not in stored:
        raise DataIntegrityError(f"{path} is not a dataset manifest; delete the folder {out_dir} and regenerate the data")
    if stored.get("format") != DATA_FORMAT:
        raise ValueError(
            f"dataset at {out_dir} has data format {stored.get('format')!r}, this version of tokenrl reads and writes "
            f"format {DATA_FORMAT} (see tokenrl.tasks.manifest.DATA_FORMAT for what changed); delete the folder {out_dir} "
            "and regenerate the data (a training run with the same settings does it)"
        )
    return stored


def load_verified_shard(out_dir: str, path: str, checksum: str) -> ReplayBuffer:
    """Verify ``path`` against its recorded SHA-256, then load it."""
    digest = file_sha256(path)
    if digest != checksum:
        raise DataIntegrityError(
            f"{path} does not match its checksum in {manifest_path(out_dir)} (truncated or edited; sha256 "
            f"{digest[:12]}... vs recorded {checksum[:12]}...); {_regenerate_hint(path)}"
        )
    try:
        return ReplayBuffer.load(path)
    except Exception as error:  # a file that matches its checksum but does not parse was written damaged
        raise DataIntegrityError(f"{path} cannot be read ({error}); {_regenerate_hint(path)}") from error

def compare_manifest(out_dir: str, stored: dict, wanted: dict) -> None:
    """Raise ValueError naming every setting of ``wanted`` that differs from the stored manifest."""
    wanted = json.loads(json.dumps(wanted, default=str))  # normalise tuples etc. as stored
    diffs = {k: (stored.get(k), v) for k, v in wanted.items() if k not in _NOT_COMPARED and stored.get(k) != v}
    if diffs:
        detail = ", ".join(f"{k}: stored {a!r} vs requested {b!r}" for k, (a, b) in sorted(diffs.items()))
        raise ValueError(
            f"dataset at {out_dir} was generated with different settings ({detail}); "
            "use another data directory or delete this one to regenerate"
        )
