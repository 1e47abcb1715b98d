"""Offline teacher data: samples from the teacher with the teacher's sparse top-p cache along each.

The cache comes from the sampling pass itself when the sampler can keep it (:class:`TopPCachingSampler`, e.g.
:class:`tokenrl.lm.sampling.TeacherSampler`: every logits row it samples from is the teacher's at a cached
state), and otherwise from a second, teacher-forced pass (:func:`compute_top_p_cache`).

Data are written in shards (one :class:`~tokenrl.data.buffer.ReplayBuffer` file each) next to a
``manifest.json`` that records every setting that changes the data and the SHA-256 of each shard
(:mod:`tokenrl.tasks.manifest`). Generation resumes at the first missing shard, and a training run loads the shards without
running the teacher again. Every load compares the manifest with the requested settings (a mismatch names
the field) and every shard with its checksum (a damaged shard is named, with the fix: delete it and rerun,
which regenerates exactly that shard; shard files are byte-reproducible).
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from tokenrl.core.progress import track
from tokenrl.lm import scoring
from tokenrl.data.buffer import ReplayBuffer, TopPCache, manifest_path, write_json_atomic
from tokenrl.core.padding import right_pad
from tokenrl.core.ranks import barrier
from tokenrl.core.teachers import Teacher
from tokenrl.core.top_p import check_p
from tokenrl.tasks.manifest import (
    DataIntegrityError,
    compare_manifest,
    data_manifest,
    load_verified_shard,
    read_manifest,
    record_checksum,
)

#: sampler(prompts, seed) -> [(response_tokens, terminated)], EOS included as last token when terminated
Sampler = Callable[[Sequence[Sequence[int]], int], list[tuple[list[int], bool]]]


@runtime_checkable
class TopPCachingSampler(Protocol):
    """A :data:`Sampler` that samples from the teacher itself and can return the teacher's top-p sets of its own
    sampling pass (the logits of every state it samples at), so data generation needs no second forward."""

    def __call__(self, prompts: Sequence[Sequence[int]], seed: int) -> list[tuple[list[int], bool]]: ...

    def with_top_p_cache(
        self, prompts: Sequence[Sequence[int]], seed: int, p: float
    ) -> tuple[list[tuple[list[int], bool]], list[TopPCache]]:
        """The samples of ``self(prompts, seed)`` and one :class:`TopPCache` at ``p`` per sample."""


@dataclass(frozen=True)
class FixedResponses:
    """Stands in for a :data:`Sampler` when the responses exist already (a text corpus): response ``j`` belongs to
    prompt ``j`` of the list being stored, so generation takes each shard's slice instead of sampling (needs
    ``samples_per_prompt = 1``; the top-p cache is a teacher-forced pass). The responses are part of the data, so
    the manifest passed with them must identify them (e.g. the source file's SHA-256 and a digest of the tokens).

    Attributes:
        responses: one non-empty token list per prompt.
        terminated: per response, whether it ends with EOS (EOS its last token).
    """

    responses: list[list[int]]
    terminated: list[bool]

    def shard(self, index: int, shard_prompts: int) -> list[tuple[list[int], bool]]:
        """The ``(response, terminated)`` pairs of shard ``index`` (the same layout as the prompts' shards)."""
        lo = index * shard_prompts
        return list(zip(self.responses[lo : lo + shard_prompts], self.terminated[lo : lo + shard_prompts]))


def shard_path(out_dir: str, index: int) -> str:
    """The file of shard ``index`` of the dataset in ``out_dir`` (the one place that names shards)."""
    return os.path.join(out_dir, f"shard-{index:05d}.safetensors")



@torch.no_grad()
def compute_top_p_cache(
    teacher: Teacher,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    p: float,
    batch_size: int = 32,
    max_k: int | None = None,
    pad_id: int = 0,
) -> list[TopPCache]:
    """Teacher-forced top-p sets at the ``len(response) + 1`` states of each trajectory.

    Teacher logits are computed only at those states, a chunk at a time (:func:`tokenrl.lm.scoring.top_p_sets`),
    so memory does not grow with the prompt length, the batch size or the vocabulary.

    Args:
        teacher: any :class:`~tokenrl.core.teachers.Teacher`.
        prompts, responses: token lists of equal count.
        p: top-p threshold of the cache.
        batch_size: sequences per teacher forward.
        max_k: optional cap on set sizes (see :func:`tokenrl.core.top_p.top_p_sparse`).
        pad_id: padding id for the teacher input.

    Returns:
        One :class:`TopPCache` per trajectory (ids int32, log-probs float16, descending probability).
    """
    check_p(p)
    out: list[TopPCache] = []
    for start in range(0, len(prompts), batch_size):
        ps, rs = prompts[start : start + batch_size], responses[start : start + batch_size]
        full = [list(a) + list(b) for a, b in zip(ps, rs)]
        tokens_BL, lengths_B = right_pad(full, pad_id)
        prompt_lens_B = torch.tensor([len(a) for a in ps], dtype=torch.long)
        # The sets of all R + 1 states of every row, flattened row-major, then cut per trajectory.
        sizes, ids, logprobs = [], [], []
        for sets in scoring.top_p_sets(teacher, tokens_BL, lengths_B, prompt_lens_B, p, max_k=max_k, pad_id=pad_id):
            sizes.append(sets.sizes.cpu().numpy().astype(np.int32))
            ids.append(sets.ids[sets.mask].cpu().numpy().astype(np.int32))
            logprobs.append(sets.logprobs[sets.mask].cpu().numpy().astype(np.float16))
        sizes_N, ids_M, logprobs_M = np.concatenate(sizes), np.concatenate(ids), np.concatenate(logprobs)
        state_ends = np.cumsum([len(r) + 1 for r in rs])
        member_ends = np.cumsum(sizes_N)[state_ends - 1]
        for b in range(len(ps)):
            states = slice(state_ends[b] - len(rs[b]) - 1, state_ends[b])
            members = slice(member_ends[b - 1] if b else 0, member_ends[b])
            out.append(TopPCache(sizes=sizes_N[states], ids=ids_M[members], logprobs=logprobs_M[members]))
    return out


def generate_teacher_data(
    teacher: Teacher,
    sampler: Sampler,
    prompts: Sequence[Sequence[int]],
    out_dir: str,
    *,
    samples_per_prompt: int,
    cache_top_p: float,
    manifest: dict,
    shard_prompts: int = 256,
    seed: int = 0,
    pad_id: int = 0,
    cache_batch_size: int = 32,
    progress: bool = True,
    shard_rank: int = 0,
    shard_world: int = 1,
) -> ReplayBuffer:
    """Sample the teacher on ``prompts`` and store trajectories with their top-p cache, resumably.

    Every shard is checksummed in the manifest when written; shards already on disk are verified, and a
    shard without a recorded checksum (the run died between writing it and recording it) is regenerated.

    Args:
        teacher: the teacher (for the cache pass).
        sampler: draws responses from the teacher (its sampling top-p/temperature are the caller's choice and
            belong in ``manifest``). A :class:`TopPCachingSampler` also supplies the cache from its sampling
            pass (it must sample from ``teacher`` itself); otherwise the cache is a teacher-forced pass.
            :class:`FixedResponses` stores given responses (a text corpus) instead of sampling.
        prompts: prompt token lists.
        out_dir: dataset directory (created); holds ``manifest.json`` and ``shard-XXXXX.safetensors``.
        samples_per_prompt: responses drawn per prompt.
        cache_top_p: p of the stored top-p sets.
        manifest: settings identifying the data (teacher, tokenizer, sampling); completed by
            :func:`data_manifest`, stored, and compared field by field with a stored one.
        shard_prompts: prompts per shard.
        seed: base seed; shard ``i`` uses ``seed * 1_000_003 + i`` so a resumed run draws the same data.
        pad_id: padding id.
        cache_batch_size: sequences per teacher forward in the cache pass (not used by a
            :class:`TopPCachingSampler`).
        progress: show progress (:func:`tokenrl.core.progress.track`).
        shard_rank, shard_world: generate only the shards ``i`` with ``i % shard_world == shard_rank`` (one
            process of a sharded generation; every shard's seed depends on ``i`` only, so the files are those
            of a single-process run).

    Returns:
        The dataset as one buffer (with ``shard_world > 1``: the whole dataset, after every rank's shards are
        written and recorded).

    Raises:
        ValueError: the stored manifest was written with other settings (the field is named).
        DataIntegrityError: a stored shard or the manifest is damaged (the file is named).
    """
    return _load_or_generate(
        teacher, sampler, prompts, out_dir, samples_per_prompt=samples_per_prompt, cache_top_p=cache_top_p,
        manifest=manifest, shard_prompts=shard_prompts, seed=seed, pad_id=pad_id,
        cache_batch_size=cache_batch_size, progress=progress, shard_rank=shard_rank, shard_world=shard_world,
    )[0]


def _open_manifest(out_dir: str, wanted: dict) -> dict:
    """The stored manifest, compared with ``wanted``; written (with no shard recorded yet) when absent."""
    stored = read_manifest(out_dir)
    if stored is None:
        stored = {**wanted, "shards": {}}
        write_json_atomic(manifest_path(out_dir), stored)
    else:
        compare_manifest(out_dir, stored, wanted)
    stored.setdefault("shards", {})
    return stored


def _load_or_generate(
    teacher, sampler, prompts, out_dir, *, samples_per_prompt, cache_top_p, manifest, shard_prompts=256, seed=0,
    pad_id=0, cache_batch_size=32, progress=True, shard_rank=0, shard_world=1,
) -> tuple[ReplayBuffer, bool]:
    """:func:`generate_teacher_data`, also returning whether every shard was already on disk.

    Sharded (``shard_world > 1``, one call per rank): rank 0 writes or checks the manifest first; each rank then
    writes its own shards without touching the manifest, and rank 0 records every new shard's checksum once
    all are on disk, so no two processes ever write the manifest. Nothing is written when every shard is on disk
    and recorded, so a complete data set can be read from a read-only folder.
    """
    check_p(cache_top_p)
    if isinstance(sampler, FixedResponses) and (samples_per_prompt != 1 or len(sampler.responses) != len(prompts)):
        raise ValueError(
            f"fixed responses need samples_per_prompt=1 and one response per prompt, got samples_per_prompt="
            f"{samples_per_prompt}, {len(sampler.responses)} responses for {len(prompts)} prompts"
        )
    os.makedirs(out_dir, exist_ok=True)
    sharded = shard_world > 1
    wanted = data_manifest(
        manifest, prompts, samples_per_prompt=samples_per_prompt, cache_top_p=cache_top_p,
        shard_prompts=shard_prompts, seed=seed,
    )
    if shard_rank == 0:
        remove_orphaned_tmp(out_dir)
        stored = _open_manifest(out_dir, wanted)
    if sharded:
        barrier()  # the manifest exists and matches before any rank reads it or writes a shard
        if shard_rank != 0:
            stored = _open_manifest(out_dir, wanted)
    checksums = stored["shards"]
    names = [os.path.basename(shard_path(out_dir, i)) for i in range(wanted["n_shards"])]
    complete = all(name in checksums and os.path.exists(shard_path(out_dir, i)) for i, name in enumerate(names))
    buffer = ReplayBuffer(pad_id=pad_id, cache_top_p=cache_top_p)
    bar = track(range(shard_rank, wanted["n_shards"], shard_world), "teacher data (shards)", enabled=progress)
    for i in bar:
        path, name = shard_path(out_dir, i), names[i]
        if os.path.exists(path) and name in checksums:
            buffer.extend(load_verified_shard(out_dir, path, checksums[name]))
            continue
        chunk = prompts[i * shard_prompts : (i + 1) * shard_prompts]
        rep_prompts = [list(pr) for pr in chunk for _ in range(samples_per_prompt)]
        if isinstance(sampler, TopPCachingSampler):
            samples, caches = sampler.with_top_p_cache(rep_prompts, seed * 1_000_003 + i, cache_top_p)
        else:
            if isinstance(sampler, FixedResponses):
                samples = sampler.shard(i, shard_prompts)
            else:
                samples = sampler(rep_prompts, seed * 1_000_003 + i)
            caches = compute_top_p_cache(
                teacher, rep_prompts, [r for r, _ in samples], cache_top_p, cache_batch_size, pad_id=pad_id
            )
        responses = [r for r, _ in samples]
        terminated = [t for _, t in samples]
        shard = ReplayBuffer(pad_id=pad_id, cache_top_p=cache_top_p)
        shard.add(rep_prompts, responses, terminated, caches=caches, is_expert=True)
        shard.save(path)
        buffer.extend(shard)
        if not sharded:
            record_checksum(stored, out_dir, path)
            write_json_atomic(manifest_path(out_dir), stored)
    if not sharded:
        return buffer, complete
    barrier()  # every rank's shards are on disk
    new = [i for i, name in enumerate(names) if name not in checksums]
    if shard_rank == 0 and new:  # a complete data set is only read: a shared cache may be read-only
        for i in new:
            record_checksum(stored, out_dir, shard_path(out_dir, i))
        write_json_atomic(manifest_path(out_dir), stored)
    barrier()  # the manifest records every shard
    return load_teacher_data(out_dir), complete


def load_teacher_data(out_dir: str, manifest: dict | None = None) -> ReplayBuffer:
    """Load and verify a complete dataset written by :func:`generate_teacher_data`.

    Args:
        out_dir: the dataset directory.
        manifest: settings to compare with the stored manifest (only the keys given are compared).

    Raises:
        FileNotFoundError: no manifest, or a shard is missing (the generation was interrupted).
        ValueError: a given setting differs from the stored one.
        DataIntegrityError: the manifest or a shard is damaged (its checksum differs, or it cannot be read).
    """
    stored = read_manifest(out_dir)
    if stored is None:
        raise FileNotFoundError(f"no dataset manifest at {manifest_path(out_dir)}; generate the data first")
    if manifest is not None:
        compare_manifest(out_dir, stored, manifest)
    checksums = stored.get("shards", {})
    buffer = ReplayBuffer(pad_id=0, cache_top_p=float(stored["cache_top_p"]))
    for i in range(int(stored["n_shards"])):
        shard = shard_path(out_dir, i)
        name = os.path.basename(shard)
        if not os.path.exists(shard) or name not in checksums:
            raise FileNotFoundError(
                f"{shard} is missing or was never completed: the generation was interrupted; rerun it to resume"
            )
        part = load_verified_shard(out_dir, shard, checksums[name])
        buffer.pad_id = part.pad_id
        buffer.extend(part)
    extra = sorted(set(checksums) - {os.path.basename(shard_path(out_dir, i)) for i in range(int(stored["n_shards"]))})
    if extra:
        raise DataIntegrityError(
            f"{manifest_path(out_dir)} lists n_shards={stored['n_shards']} but has checksums of {len(checksums)} "
            f"shards ({extra[0]}, ...): the manifest was edited; delete {out_dir} and regenerate the data"
        )
    return buffer


def load_or_generate_data(
    teacher: Teacher, sampler: Sampler, prompts: Sequence[Sequence[int]], out_dir: str, **generate_kwargs
) -> tuple[ReplayBuffer, bool]:
    """The offline teacher data in ``out_dir``: verified and loaded when on disk, generated (or resumed) otherwise.

    The stored manifest is compared with the requested settings and every shard with its checksum on each
    call, whether or not the dataset is complete.

    Args:
        teacher, sampler, prompts, out_dir: as in :func:`generate_teacher_data`.
        **generate_kwargs: the keyword arguments of :func:`generate_teacher_data`; with ``shard_world > 1``
            (one rank of a torchrun job) each rank generates its shards, waits for the others and loads all.

    Returns:
        ``(buffer, was_complete)``.
    """
    return _load_or_generate(teacher, sampler, prompts, out_dir, **generate_kwargs)


def remove_orphaned_tmp(directory: str) -> list[str]:
    """Delete ``*.tmp-PID`` files in ``directory`` left by processes that no longer run; returns their paths."""
    removed = []
    for name in os.listdir(directory) if os.path.isdir(directory) else []:
        match = re.search(r"\.tmp-(\d+)$", name)
        if match and not _process_alive(int(match.group(1))):
            path = os.path.join(directory, name)
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
                removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
