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

from tokenrl import scoring
from tokenrl.buffer import ReplayBuffer, TopPCache, manifest_path, write_json_atomic
from tokenrl.teachers import Teacher
from tokenrl.top_p import check_p

#: sampler(prompts, seed) -> [(response_tokens, terminated)], EOS included as last token when terminated
Sampler = Callable[[Sequence[Sequence[int]], int], list[tuple[list[int], bool]]]


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

    Teacher logits are computed only at those states, a chunk at a time (:func:`tokenrl.scoring.top_p_sets`),
    so memory does not grow with the prompt length, the batch size or the vocabulary.

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

    Returns:
        The whole dataset as one buffer.
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
    bar = tqdm(range(n_shards), desc="teacher data (shards)", disable=not progress)
    for i in bar:
        path = os.path.join(out_dir, f"shard-{i:05d}.safetensors")
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
        shard = os.path.join(out_dir, f"shard-{i:05d}.safetensors")
        if not os.path.exists(shard):
            raise FileNotFoundError(f"{shard} is missing: the generation was interrupted; rerun it to resume")
        part = ReplayBuffer.load(shard)
        buffer.pad_id = part.pad_id
        buffer.extend(part)
    return buffer


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
