"""The replay buffer shared by every algorithm: token trajectories plus the teacher's sparse top-p cache.

Storage is ragged: per trajectory, the prompt and response ids, its flags, and for each of the
``len(response) + 1`` visited states the teacher's top-p set (ids in int32, log-probs in float16, in
descending probability). Nothing vocabulary-sized is ever stored per token. A sampled :class:`Batch`
pads the responses to the longest in the batch and the sets to the largest set in the batch.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from tokenrl.core.files import publish
from tokenrl.core.top_p import check_p, restrict_top_p

BUFFER_FORMAT = "tokenrl-buffer-v2"
"""Format tag of :meth:`ReplayBuffer.save` files (v2: one sorted-JSON metadata entry, byte-reproducible)."""


@dataclass
class TopPCache:
    """The teacher's top-p sets along one trajectory (states ``s_0 .. s_len``).

    Attributes:
        sizes: ``[len + 1]`` int set size at each state.
        ids: ``[sum(sizes)]`` int32 token ids, each set in descending probability.
        logprobs: ``[sum(sizes)]`` float16 full-distribution log-probs matching ``ids``.
    """

    sizes: np.ndarray
    ids: np.ndarray
    logprobs: np.ndarray


class ActionSlots:
    """The ``action_slot_BT`` convention of :class:`Batch` and :class:`tokenrl.lm.policy.CandidateQ`: the slot of the
    taken action among its state's candidates, -1 when it lies outside the set and on padding."""

    action_slot_BT: torch.Tensor

    @property
    def action_in_set_BT(self) -> torch.Tensor:
        """``[B, T]`` bool: the taken action lies in its state's set (False on padding)."""
        return self.action_slot_BT >= 0


@dataclass
class Batch(ActionSlots):
    """A padded batch of trajectories: ``B`` rows, ``T`` response slots, ``S = T + 1`` states, ``K`` set width
    (shape letters as in :mod:`tokenrl.core`).

    The model input is ``[left-padded prompt | right-padded response]``: response token ``t`` sits at column
    ``prompt_width + t`` and the logits of state ``s_t`` are at column ``prompt_width - 1 + t``.

    Attributes:
        input_ids_BL: ``[B, L]`` long, ``L = prompt_width + T``.
        attention_mask_BL: ``[B, L]`` long.
        position_ids_BL: ``[B, L]`` long (count of real tokens before each column; padding repeats the last).
        prompt_width: columns taken by the left-padded prompts.
        actions_BT: ``[B, T]`` long response tokens (pad_id on padding).
        action_mask_BT: ``[B, T]`` bool, True at ``t < lengths_B``.
        lengths_B: ``[B]`` long response lengths.
        terminated_B: ``[B]`` bool, response ended with EOS.
        truncated_B: ``[B]`` bool, response cut at max_new_tokens.
        is_expert_B: ``[B]`` bool, trajectory comes from the teacher (offline data) rather than a rollout.
        rewards_BT: ``[B, T]`` float env rewards (0 when none were recorded).
        cand_ids_BSK: ``[B, S, K]`` long teacher top-p ids (pad_id on padding).
        cand_logprobs_BSK: ``[B, S, K]`` float teacher log-probs (-inf on padding).
        cand_mask_BSK: ``[B, S, K]`` bool set membership (restricted to the requested p).
        state_mask_BS: ``[B, S]`` bool, True at ``t <= lengths_B``.
        action_slot_BT: ``[B, T]`` long, slot of the taken action (teacher's or the learner's) in the set of
            ``s_t``; -1 if outside the set or on padding.
        action_logprob_BT: ``[B, T]`` float teacher log-prob of the taken action, read from the stored
            (unrestricted) cache; ``-inf`` where the action is not in it or there is no cache.
        top_p: the p the candidate sets were restricted to.
        teacher_logprobs_BSV: ``[B, S, V]`` float teacher log-probs over the whole vocabulary at every state
            (uniform on padding), for losses over the full vocabulary; None unless added by
            :func:`tokenrl.lm.scoring.with_teacher_logprobs` (the trainer does for algorithms with
            ``needs_teacher_logprobs``).
        lm_batch: a pre-training batch of the task's corpus (its own ``B`` rows of free text with their cached
            top-p sets, at the same p), for the language-modelling terms of algorithms with ``needs_lm_batch``;
            None unless the trainer attached one (:func:`tokenrl.run.step.draw_batches`).
    """

    input_ids_BL: torch.Tensor
    attention_mask_BL: torch.Tensor
    position_ids_BL: torch.Tensor
    prompt_width: int
    actions_BT: torch.Tensor
    action_mask_BT: torch.Tensor
    lengths_B: torch.Tensor
    terminated_B: torch.Tensor
    truncated_B: torch.Tensor
    is_expert_B: torch.Tensor
    rewards_BT: torch.Tensor
    cand_ids_BSK: torch.Tensor
    cand_logprobs_BSK: torch.Tensor
    cand_mask_BSK: torch.Tensor
    state_mask_BS: torch.Tensor
    action_slot_BT: torch.Tensor
    action_logprob_BT: torch.Tensor
    top_p: float
    teacher_logprobs_BSV: torch.Tensor | None = None
    lm_batch: "Batch | None" = None

    def to(self, device: torch.device | str) -> "Batch":
        """Move every tensor (and the attached ``lm_batch``) to ``device``."""
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        return Batch(**{k: v.to(device) if torch.is_tensor(v) or isinstance(v, Batch) else v for k, v in kw.items()})


def require_teacher_logprobs(batch: Batch, algo_name: str) -> torch.Tensor:
    """``batch.teacher_logprobs_BSV``, or a ValueError that names the algorithm and the fix when it is missing."""
    if batch.teacher_logprobs_BSV is None:
        raise ValueError(
            f"{algo_name} with top_p=1.0 (full vocabulary) needs the teacher's log-probs in the batch: add them with "
            "tokenrl.lm.scoring.with_teacher_logprobs(batch, teacher, pad_id) (the trainer does), or set top_p < 1 "
            "to use the cached top-p sets"
        )
    return batch.teacher_logprobs_BSV


def require_lm_batch(batch: Batch, algo_name: str) -> Batch:
    """``batch.lm_batch``, or a ValueError that names the algorithm and the fix when it is missing."""
    if batch.lm_batch is None:
        raise ValueError(
            f"{algo_name} asks for a pre-training batch (needs_lm_batch) but the batch has none: attach one drawn "
            "from the task's corpus, dataclasses.replace(batch, lm_batch=corpus.sample(...)) (the trainer does), or "
            "set the algorithm's LM term to the distillation batch (lm_batch=expert) or off"
        )
    return batch.lm_batch


@dataclass
class ReplayBuffer:
    """Ragged store of token trajectories and their teacher top-p caches.

    Args:
        pad_id: id used to pad batches (any valid id; padded slots are masked).
        cache_top_p: the p at which the stored sets were computed (batches may shrink them to a smaller p).
        capacity: keep at most this many trajectories (oldest dropped first); None = unbounded.
    """

    pad_id: int = 0
    cache_top_p: float = 1.0
    capacity: int | None = None
    prompts: list[np.ndarray] = field(default_factory=list)
    responses: list[np.ndarray] = field(default_factory=list)
    terminated: list[bool] = field(default_factory=list)
    truncated: list[bool] = field(default_factory=list)
    is_expert: list[bool] = field(default_factory=list)
    rewards: list[np.ndarray] = field(default_factory=list)
    caches: list[TopPCache | None] = field(default_factory=list)

    def __post_init__(self):
        check_p(self.cache_top_p)

    def __len__(self) -> int:
        return len(self.responses)

    # ------------------------------------------------------------------------------------------------
    # Filling
    # ------------------------------------------------------------------------------------------------
    def add(
        self,
        prompts: list[list[int]],
        responses: list[list[int]],
        terminated: list[bool],
        truncated: list[bool] | None = None,
        caches: list[TopPCache] | None = None,
        rewards: list[list[float]] | None = None,
        is_expert: bool | list[bool] = True,
    ) -> None:
        """Append trajectories (offline data or env rollouts).

        Args:
            prompts: prompt token lists (non-empty).
            responses: response token lists (non-empty; EOS included as last token when terminated).
            terminated: ended with EOS.
            truncated: cut at max_new_tokens (default: ``not terminated``).
            caches: per trajectory, the teacher's top-p sets at its ``len(response) + 1`` states; required by
                the TD and KD algorithms (see :func:`tokenrl.tasks.datagen.compute_top_p_cache`).
            rewards: optional per-token env rewards.
            is_expert: whether the trajectories are teacher data (True) or the learner's rollouts (False).
        """
        n = len(responses)
        if not (len(prompts) == len(terminated) == n):
            raise ValueError(
                f"prompts ({len(prompts)}), responses ({n}) and terminated ({len(terminated)}) must have equal length"
            )
        truncated = [not t for t in terminated] if truncated is None else list(truncated)
        flags = [is_expert] * n if isinstance(is_expert, bool) else list(is_expert)
        for i in range(n):
            if len(prompts[i]) == 0:
                raise ValueError(f"trajectory {i}: empty prompt; every state needs at least one context token")
            if len(responses[i]) == 0:
                raise ValueError(f"trajectory {i}: empty response")
            if terminated[i] and truncated[i]:
                raise ValueError(f"trajectory {i}: cannot be both terminated and truncated")
            cache = caches[i] if caches is not None else None
            if cache is not None and len(cache.sizes) != len(responses[i]) + 1:
                raise ValueError(
                    f"trajectory {i}: cache has {len(cache.sizes)} states, expected len(response) + 1 = "
                    f"{len(responses[i]) + 1}"
                )
            self.prompts.append(np.asarray(prompts[i], dtype=np.int32))
            self.responses.append(np.asarray(responses[i], dtype=np.int32))
            self.terminated.append(bool(terminated[i]))
            self.truncated.append(bool(truncated[i]))
            self.is_expert.append(bool(flags[i]))
            r = np.zeros(len(responses[i]), np.float32) if rewards is None else np.asarray(rewards[i], np.float32)
            self.rewards.append(r)
            self.caches.append(cache)
        self._enforce_capacity()

    # ------------------------------------------------------------------------------------------------
    # Reporting
    # ------------------------------------------------------------------------------------------------
    @property
    def n_tokens(self) -> int:
        """Number of stored response tokens."""
        return int(sum(len(r) for r in self.responses))

    def nbytes(self) -> int:
        """Bytes held by the stored arrays."""
        total = 0
        for i in range(len(self)):
            total += self.prompts[i].nbytes + self.responses[i].nbytes + self.rewards[i].nbytes + 3
            c = self.caches[i]
            if c is not None:
                total += c.sizes.nbytes + c.ids.nbytes + c.logprobs.nbytes
        return total

    def bytes_per_token(self) -> float:
        """Memory per stored response token (the whole store divided by the token count)."""
        return self.nbytes() / max(self.n_tokens, 1)

    def set_sizes(self) -> np.ndarray:
        """All cached top-p set sizes (one per stored state)."""
        sizes = [c.sizes for c in self.caches if c is not None]
        return np.concatenate(sizes) if sizes else np.zeros(0, np.int64)

    # ------------------------------------------------------------------------------------------------
    # Sampling
    # ------------------------------------------------------------------------------------------------
    def sample(self, batch_size: int, generator: torch.Generator, top_p: float | None = None) -> Batch:
        """Uniformly sample ``batch_size`` trajectories (with replacement) and pad them into a :class:`Batch`."""
        if len(self) == 0:
            raise ValueError("cannot sample from an empty replay buffer; add data first")
        idx = torch.randint(len(self), (batch_size,), generator=generator).tolist()
        return self.collate(idx, top_p=top_p)

    def collate(self, indices: list[int], top_p: float | None = None) -> Batch:
        """Pad the trajectories at ``indices`` into a :class:`Batch`.

        Args:
            indices: trajectory indices.
            top_p: restrict the cached sets to this p (<= ``cache_top_p``; None or 1.0 keeps them as stored).
        """
        p = self.cache_top_p if top_p is None else check_p(top_p)
        if p < 1.0 and p > self.cache_top_p + 1e-12:
            raise ValueError(
                f"the buffer's top-p cache was built at p={self.cache_top_p}; cannot restrict it to the larger "
                f"p={p}. Regenerate the data with a cache p >= {p}, or use p=1.0 (dense, no restriction)."
            )
        B = len(indices)
        prompts = [self.prompts[i] for i in indices]
        responses = [self.responses[i] for i in indices]
        P = max(len(x) for x in prompts)
        T = max(len(x) for x in responses)
        S = T + 1
        input_ids = np.full((B, P + T), self.pad_id, np.int64)
        attn = np.zeros((B, P + T), np.int64)
        lengths = np.zeros(B, np.int64)
        rewards = np.zeros((B, T), np.float32)
        caches = [self.caches[i] for i in indices]
        have_cache = all(c is not None for c in caches)
        if not have_cache and any(c is not None for c in caches):
            raise ValueError(
                "batch mixes trajectories with and without a teacher top-p cache; add rollouts with caches "
                "(tokenrl.tasks.datagen.compute_top_p_cache) or keep them in a separate buffer"
            )
        K = max(int(c.sizes.max()) for c in caches) if have_cache else 1
        cand_ids = np.full((B, S, K), self.pad_id, np.int64)
        cand_lp = np.full((B, S, K), -np.inf, np.float32)
        cand_mask = np.zeros((B, S, K), bool)
        for b, i in enumerate(indices):
            pl, rl = len(prompts[b]), len(responses[b])
            input_ids[b, P - pl : P] = prompts[b]
            input_ids[b, P : P + rl] = responses[b]
            attn[b, P - pl : P + rl] = 1
            lengths[b] = rl
            rewards[b, :rl] = self.rewards[i]
            c = caches[b]
            if have_cache:
                # Ragged -> padded: slot k of state t is valid iff k < size_t.
                slot = np.arange(K)[None, :] < c.sizes[:, None]
                cand_mask[b, : rl + 1] = slot
                cand_ids[b, : rl + 1][slot] = c.ids
                cand_lp[b, : rl + 1][slot] = c.logprobs.astype(np.float32)
        t = lambda x: torch.from_numpy(x)  # noqa: E731
        attention_mask = t(attn)
        position_ids = (attention_mask.cumsum(1) - 1).clamp_min(0)
        lengths_t = t(lengths)
        action_mask = torch.arange(T)[None, :] < lengths_t[:, None]
        actions = t(input_ids[:, P:]).clone()
        cand_ids_t, cand_lp_t, cand_mask_t = t(cand_ids), t(cand_lp), t(cand_mask)
        state_mask = torch.arange(S)[None, :] <= lengths_t[:, None]
        cand_mask_t &= state_mask[:, :, None]
        in_cache = (cand_ids_t[:, :T] == actions[:, :, None]) & cand_mask_t[:, :T]
        action_lp = torch.where(in_cache, cand_lp_t[:, :T], torch.full_like(cand_lp_t[:, :T], float("-inf")))
        action_lp = action_lp.amax(-1) if K > 0 else torch.full((B, T), float("-inf"))
        action_lp = action_lp.masked_fill(~action_mask, float("-inf"))
        if have_cache and p < self.cache_top_p:
            cand_mask_t = restrict_top_p(cand_lp_t, cand_mask_t, p)
        match = (cand_ids_t[:, :T] == actions[:, :, None]) & cand_mask_t[:, :T]
        action_slot = torch.where(match.any(-1), match.float().argmax(-1), torch.full_like(actions, -1))
        action_slot = torch.where(action_mask, action_slot, torch.full_like(action_slot, -1))
        return Batch(
            input_ids_BL=t(input_ids),
            attention_mask_BL=attention_mask,
            position_ids_BL=position_ids,
            prompt_width=P,
            actions_BT=actions,
            action_mask_BT=action_mask,
            lengths_B=lengths_t,
            terminated_B=torch.tensor([self.terminated[i] for i in indices]),
            truncated_B=torch.tensor([self.truncated[i] for i in indices]),
            is_expert_B=torch.tensor([self.is_expert[i] for i in indices]),
            rewards_BT=t(rewards),
            cand_ids_BSK=cand_ids_t,
            cand_logprobs_BSK=cand_lp_t,
            cand_mask_BSK=cand_mask_t,
            state_mask_BS=state_mask,
            action_slot_BT=action_slot,
            action_logprob_BT=action_lp,
            top_p=p,
        )

    # ------------------------------------------------------------------------------------------------
    # Persistence
    # ------------------------------------------------------------------------------------------------
    def save(self, path: str) -> None:
        """Write the buffer to one safetensors file (ragged arrays + offsets), atomically."""
        if any(c is None for c in self.caches) and any(c is not None for c in self.caches):
            raise ValueError("cannot save a buffer where only some trajectories have a top-p cache")
        has_cache = len(self) > 0 and self.caches[0] is not None
        cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)  # noqa: E731
        arrays = {
            "prompt_lens": np.array([len(x) for x in self.prompts], np.int64),
            "prompts": cat(self.prompts, np.int32),
            "response_lens": np.array([len(x) for x in self.responses], np.int64),
            "responses": cat(self.responses, np.int32),
            "rewards": cat(self.rewards, np.float32),
            "terminated": np.array(self.terminated, np.uint8),
            "truncated": np.array(self.truncated, np.uint8),
            "is_expert": np.array(self.is_expert, np.uint8),
        }
        if has_cache:
            arrays["cache_sizes"] = cat([c.sizes for c in self.caches], np.int32)
            arrays["cache_ids"] = cat([c.ids for c in self.caches], np.int32)
            arrays["cache_logprobs"] = cat([c.logprobs for c in self.caches], np.float16)
        # One metadata entry with sorted keys: safetensors writes a multi-key metadata map in hash order, and
        # the dataset checksums need byte-identical files for identical contents.
        meta = {"pad_id": self.pad_id, "cache_top_p": self.cache_top_p, "format": BUFFER_FORMAT}
        tmp = f"{path}.tmp-{os.getpid()}"
        save_file(arrays, tmp, metadata={"tokenrl": json.dumps(meta, sort_keys=True)})
        publish(tmp, path)  # safetensors writes 0600; the umask decides who may read the data

    @classmethod
    def load(cls, path: str, capacity: int | None = None) -> "ReplayBuffer":
        """Read a buffer written by :meth:`save`."""
        from safetensors import safe_open

        with safe_open(path, framework="numpy") as f:
            meta = f.metadata() or {}
        meta = json.loads(meta["tokenrl"]) if "tokenrl" in meta else meta  # the v1 files had one key per field
        if meta.get("format") not in (BUFFER_FORMAT, "tokenrl-buffer-v1"):
            raise ValueError(f"{path} is not a tokenrl replay-buffer file (format={meta.get('format')!r})")
        a = load_file(path)
        buf = cls(pad_id=int(meta["pad_id"]), cache_top_p=float(meta["cache_top_p"]), capacity=capacity)
        split = lambda x, lens: np.split(x, np.cumsum(lens)[:-1]) if len(lens) else []  # noqa: E731
        prompts = split(a["prompts"], a["prompt_lens"])
        responses = split(a["responses"], a["response_lens"])
        rewards = split(a["rewards"], a["response_lens"])
        caches = None
        if "cache_sizes" in a:
            sizes = split(a["cache_sizes"], a["response_lens"] + 1)
            per_traj = [int(s.sum()) for s in sizes]
            ids = split(a["cache_ids"], per_traj)
            lps = split(a["cache_logprobs"], per_traj)
            caches = [TopPCache(s, i, lp) for s, i, lp in zip(sizes, ids, lps)]
        buf.add(
            [p.tolist() for p in prompts],
            [r.tolist() for r in responses],
            a["terminated"].astype(bool).tolist(),
            a["truncated"].astype(bool).tolist(),
            caches=caches,
            rewards=[r.tolist() for r in rewards],
            is_expert=a["is_expert"].astype(bool).tolist(),
        )
        return buf

    def extend(self, other: "ReplayBuffer") -> None:
        """Append every trajectory of ``other`` (same pad id; its cache p must match)."""
        if len(other) and abs(other.cache_top_p - self.cache_top_p) > 1e-12:
            raise ValueError(f"cache p mismatch: {other.cache_top_p} vs {self.cache_top_p}")
        for name in ("prompts", "responses", "terminated", "truncated", "is_expert", "rewards", "caches"):
            getattr(self, name).extend(getattr(other, name))
        self._enforce_capacity()

    def _enforce_capacity(self) -> None:
        if self.capacity is not None and len(self) > self.capacity:
            drop = len(self) - self.capacity
            for name in ("prompts", "responses", "terminated", "truncated", "is_expert", "rewards", "caches"):
                del getattr(self, name)[:drop]


def manifest_path(directory: str) -> str:
    """Path of a dataset directory's manifest file."""
    return os.path.join(directory, "manifest.json")


def write_json_atomic(path: str, obj: dict) -> None:
    """Write JSON to ``path`` via a temporary file and rename, so a crash never leaves half a file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
