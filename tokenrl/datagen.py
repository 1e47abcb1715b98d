"""Offline teacher data: samples from the teacher plus a teacher-forced pass storing its sparse top-p cache.

Data are written in shards (one :class:`~tokenrl.buffer.ReplayBuffer` file each) next to a
``manifest.json`` that records the teacher, tokenizer, p and sampling settings. Generation resumes at the
first missing shard, and a training run loads the shards without running the teacher again. A manifest
that does not match the requested settings is an error (never silently mixed data).
"""

from __future__ import annotations

import json
import os
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from tokenrl.buffer import ReplayBuffer, TopPCache, manifest_path, write_json_atomic
from tokenrl.distributed import barrier
from tokenrl.teachers import Teacher
from tokenrl.top_p import check_p, top_p_sparse

#: sampler(prompts, seed) -> [(response_tokens, terminated)], EOS included as last token when terminated
Sampler = Callable[[Sequence[Sequence[int]], int], list[tuple[list[int], bool]]]


def shard_path(out_dir: str, index: int) -> str:
    """The file of shard ``index`` of the dataset in ``out_dir`` (the one place that names shards)."""
    return os.path.join(out_dir, f"shard-{index:05d}.safetensors")


def right_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists into ``(tokens_BT, lengths_B)``."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    tokens = torch.full((len(seqs), int(lengths.max()) if len(seqs) else 0), pad_id, dtype=torch.long)
    for b, s in enumerate(seqs):
        tokens[b, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    return tokens, lengths


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

    Args:
        teacher: any :class:`~tokenrl.teachers.Teacher`.
        prompts, responses: token lists of equal count.
        p: top-p threshold of the cache.
        batch_size: sequences per teacher forward.
        max_k: optional cap on set sizes (see :func:`tokenrl.top_p.top_p_sparse`).
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
        logits_BLV = teacher.sequence_logits(tokens_BL, lengths_B)
        for b in range(len(ps)):
            pl, rl = len(ps[b]), len(rs[b])
            # State s_t is the prefix prompt + response[:t]; its next-token logits sit at column pl - 1 + t.
            sets = top_p_sparse(logits_BLV[b, pl - 1 : pl + rl], p, max_k=max_k, pad_id=pad_id)
            sizes = sets.sizes.cpu().numpy().astype(np.int32)
            out.append(
                TopPCache(
                    sizes=sizes,
                    ids=sets.ids[sets.mask].cpu().numpy().astype(np.int32),
                    logprobs=sets.logprobs[sets.mask].cpu().numpy().astype(np.float16),
                )
            )
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

    Args:
        teacher: the teacher (for the cache pass).
        sampler: draws responses from the teacher (its sampling top-p/temperature are the caller's choice and
            belong in ``manifest``).
        prompts: prompt token lists.
        out_dir: dataset directory (created); holds ``manifest.json`` and ``shard-XXXXX.safetensors``.
        samples_per_prompt: responses drawn per prompt.
        cache_top_p: p of the stored top-p sets.
        manifest: settings identifying the data (teacher, tokenizer, sampling); stored and checked on resume.
        shard_prompts: prompts per shard.
        seed: base seed; shard ``i`` uses ``seed * 1_000_003 + i`` so a resumed run draws the same data.
        pad_id: padding id.
        cache_batch_size: sequences per teacher forward in the cache pass.
        progress: show a tqdm bar.
        shard_rank, shard_world: generate only the shards ``i`` with ``i % shard_world == shard_rank`` (one
            process of a sharded generation; every shard's seed depends on ``i`` only, so the files are those
            of a single-process run).

    Returns:
        The dataset as one buffer (only this process's shards when ``shard_world > 1``).
    """
    check_p(cache_top_p)
    os.makedirs(out_dir, exist_ok=True)
    n_shards = (len(prompts) + shard_prompts - 1) // shard_prompts
    full_manifest = dict(manifest)
    full_manifest.update(
        {
            "n_prompts": len(prompts),
            "samples_per_prompt": samples_per_prompt,
            "cache_top_p": cache_top_p,
            "shard_prompts": shard_prompts,
            "n_shards": n_shards,
            "seed": seed,
        }
    )
    _check_or_write_manifest(out_dir, full_manifest)
    buffer = ReplayBuffer(pad_id=pad_id, cache_top_p=cache_top_p)
    bar = tqdm(range(shard_rank, n_shards, shard_world), desc="teacher data (shards)", disable=not progress)
    for i in bar:
        path = shard_path(out_dir, i)
        if os.path.exists(path):
            buffer.extend(ReplayBuffer.load(path))
            continue
        chunk = prompts[i * shard_prompts : (i + 1) * shard_prompts]
        rep_prompts = [list(pr) for pr in chunk for _ in range(samples_per_prompt)]
        samples = sampler(rep_prompts, seed * 1_000_003 + i)
        responses = [r for r, _ in samples]
        terminated = [t for _, t in samples]
        caches = compute_top_p_cache(teacher, rep_prompts, responses, cache_top_p, cache_batch_size, pad_id=pad_id)
        shard = ReplayBuffer(pad_id=pad_id, cache_top_p=cache_top_p)
        shard.add(rep_prompts, responses, terminated, caches=caches, is_expert=True)
        shard.save(path)
        buffer.extend(shard)
    return buffer


def load_teacher_data(out_dir: str, manifest: dict | None = None) -> ReplayBuffer:
    """Load a complete dataset written by :func:`generate_teacher_data` (checks the manifest if given)."""
    path = manifest_path(out_dir)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no dataset manifest at {path}; generate the data first")
    with open(path) as f:
        stored = json.load(f)
    if manifest is not None:
        _compare_manifest(out_dir, stored, manifest)
    buffer = ReplayBuffer(pad_id=0, cache_top_p=float(stored["cache_top_p"]))
    for i in range(int(stored["n_shards"])):
        shard = shard_path(out_dir, i)
        if not os.path.exists(shard):
            raise FileNotFoundError(f"{shard} is missing: the generation was interrupted; rerun it to resume")
        part = ReplayBuffer.load(shard)
        buffer.pad_id = part.pad_id
        buffer.extend(part)
    return buffer


def is_complete(out_dir: str) -> bool:
    """Whether ``out_dir`` holds a manifest and every shard it lists."""
    path = manifest_path(out_dir)
    if not os.path.exists(path):
        return False
    with open(path) as f:
        n_shards = json.load(f).get("n_shards", -1)
    return all(os.path.exists(shard_path(out_dir, i)) for i in range(n_shards))


def load_or_generate_data(
    teacher: Teacher, sampler: Sampler, prompts: Sequence[Sequence[int]], out_dir: str, **generate_kwargs
) -> tuple[ReplayBuffer, bool]:
    """The offline teacher data in ``out_dir``: loaded when complete on disk, else generated (or resumed).

    Args:
        teacher, sampler, prompts, out_dir: as in :func:`generate_teacher_data`.
        **generate_kwargs: the keyword arguments of :func:`generate_teacher_data`; with ``shard_world > 1``
            (one rank of a torchrun job) each rank generates its shards, waits for the others and loads all.

    Returns:
        ``(buffer, was_complete)``.
    """
    complete = is_complete(out_dir)
    if generate_kwargs.get("shard_world", 1) > 1:
        barrier()  # every rank has looked at the directory before any rank writes to it
        if not complete:
            generate_teacher_data(teacher, sampler, prompts, out_dir, **generate_kwargs)
        barrier()  # every rank's shards are on disk
        return load_teacher_data(out_dir), complete
    if complete:
        return load_teacher_data(out_dir), True
    return generate_teacher_data(teacher, sampler, prompts, out_dir, **generate_kwargs), False


def _check_or_write_manifest(out_dir: str, manifest: dict) -> None:
    path = manifest_path(out_dir)
    if os.path.exists(path):
        with open(path) as f:
            _compare_manifest(out_dir, json.load(f), manifest)
    else:
        write_json_atomic(path, json.loads(json.dumps(manifest)))


def _compare_manifest(out_dir: str, stored: dict, wanted: dict) -> None:
    wanted = json.loads(json.dumps(wanted))  # normalise tuples etc. as stored
    diffs = {k: (stored.get(k), v) for k, v in wanted.items() if stored.get(k) != v}
    if diffs:
        detail = ", ".join(f"{k}: stored {a!r} vs requested {b!r}" for k, (a, b) in sorted(diffs.items()))
        raise ValueError(
            f"dataset at {out_dir} was generated with different settings ({detail}); "
            "use another data directory or delete this one to regenerate"
        )
