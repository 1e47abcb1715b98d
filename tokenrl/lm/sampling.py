"""The generation engine: lock-step next-token logits of a transformers causal LM, with or without a KV cache.

One stepper serves every place that generates: the evaluation's and the data generation's sampler
(:func:`sample_responses`, :class:`TeacherSampler`), and the env rollouts of students and teachers
(:class:`tokenrl.lm.models.IncrementalTeacher`). Rows are left-padded so that every row's next token appends at
the same column, with positions counting real tokens only, so a padded row sees what an unpadded one would.
The data generation's sampler also keeps the top-p set of every logits row it samples from
(:meth:`TeacherSampler.with_top_p_cache`): those rows are the teacher's logits at exactly the states the offline
cache stores, so no second, teacher-forced pass over the data is needed.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from tokenrl.core.distributions import project_to_set
from tokenrl.core.padding import left_pad
from tokenrl.core.progress import track
from tokenrl.data.buffer import TopPCache
from tokenrl.core.top_p import check_p
from tokenrl.lm.probed_sets import probed_top_p_sets


def cache_keyword(model: torch.nn.Module) -> str:
    """The forward kwarg / output field that carries the KV cache in this transformers version.

    transformers 5.2x renamed ``past_key_values`` to ``cache`` (the old name warns, and is removed in 5.40).
    """
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"



class KVCacheStepper:
    """Next-token logits of a causal LM, one cached forward per generated token.

    :meth:`start` encodes right-padded prefixes and keeps their KV cache; :meth:`advance` appends one token
    per row. :meth:`next_token_logits` is the uncached forward of the same prefixes. The caller chooses the
    grad mode. Logits are float32, on the model's device, sliced to ``vocab_size``.

    Args:
        model: a transformers causal LM: its forward takes ``input_ids, attention_mask, position_ids,
            use_cache`` and a KV cache (``cache``, or ``past_key_values`` before transformers 5.2x), and
            returns ``.logits [B, T, V']`` and the updated cache.
        pad_token_id: id written into the left padding (never attended to).
        vocab_size: logits are sliced to ``[:vocab_size]`` so padded embedding rows (``V' > V``) are never
            actions; None keeps all ``V'``.
    """

    def __init__(self, model: torch.nn.Module, pad_token_id: int, vocab_size: int | None = None):
        self.model = model
        self.pad_token_id = pad_token_id
        self.vocab_size = vocab_size
        parameters = inspect.signature(model.forward).parameters
        self._cache_key = cache_keyword(model)
        # Only the last column's logits are needed: skip the [B, L, V] projection of the whole prefix.
        self._keep_last = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
        self._cache: Any = None
        self._attention_mask_BL: torch.Tensor | None = None
        self._next_position_B: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _forward(self, use_cache: bool, **inputs: Any) -> tuple[torch.Tensor, Any]:
        output = self.model(**inputs, use_cache=use_cache, **self._keep_last)
        return output.logits[:, -1, : self.vocab_size].float(), (output[self._cache_key] if use_cache else None)

    def next_token_logits(self, tokens_BT: torch.Tensor, lengths_B: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, V]`` of the token after the first ``lengths_B[b]`` tokens of each right-padded row (no cache)."""
        tokens_BL, attention_mask_BL, position_ids_BL = left_pad(tokens_BT.to(self.device), lengths_B, self.pad_token_id)
        logits_BV, _ = self._forward(
            False, input_ids=tokens_BL, attention_mask=attention_mask_BL, position_ids=position_ids_BL
        )
        return logits_BV

    def start(self, tokens_BT: torch.Tensor, lengths_B: torch.Tensor) -> torch.Tensor:
        """Encode right-padded prefixes ``[B, T]`` (``lengths_B`` real tokens each), keep their cache, return logits ``[B, V]``.

        The cache lives until the next :meth:`start` (or :meth:`stop`).
        """
        tokens_BL, attention_mask_BL, position_ids_BL = left_pad(tokens_BT.to(self.device), lengths_B, self.pad_token_id)
        logits_BV, self._cache = self._forward(
            True, input_ids=tokens_BL, attention_mask=attention_mask_BL, position_ids=position_ids_BL
        )
        self._attention_mask_BL = attention_mask_BL
        self._next_position_B = position_ids_BL[:, -1] + 1
        return logits_BV

    def advance(self, next_tokens_B: torch.Tensor) -> torch.Tensor:
        """Append one token per row to the cached sequences and return the following logits ``[B, V]``.

        Rows that already ended must still be given a token (e.g. padding); the caller ignores their logits.
        """
        if self._cache is None:
            raise RuntimeError("advance() called before start(); call start(tokens_BT, lengths_B) first.")
        self._attention_mask_BL = torch.cat(
            [self._attention_mask_BL, torch.ones_like(self._attention_mask_BL[:, :1])], dim=1
        )
        logits_BV, self._cache = self._forward(
            True,
            input_ids=next_tokens_B.to(self.device)[:, None],
            attention_mask=self._attention_mask_BL,
            position_ids=self._next_position_B[:, None],
            **{self._cache_key: self._cache},
        )
        self._next_position_B = self._next_position_B + 1
        return logits_BV

    def stop(self) -> None:
        """Free the KV cache of the current generation."""
        self._cache = None
        self._attention_mask_BL = None
        self._next_position_B = None


def check_prompts(prompts: Sequence[Sequence[int]]) -> None:
    """Require a token in every prompt.

    A causal LM has no distribution for the first token without a BOS, and the Teacher interface's
    sequence_logits only covers tokens after the first one.
    """
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token (e.g. a BOS)")


def _sample_batch(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    generator: torch.Generator,
    temperature: float,
    top_p: float,
    vocab_size: int | None,
    cache_top_p: float | None = None,
) -> tuple[list[list[int]], list[list[float]], list[TopPCache] | None]:
    """Sample one batch with a KV cache; also return each sampled token's log-prob and, optionally, top-p sets.

    The log-probs are under the model's untempered, untruncated distribution (log-softmax of the logits
    sliced to ``vocab_size``); tests compare them with a slow no-cache forward.

    With ``cache_top_p``, the top-p set (:func:`tokenrl.core.top_p.top_p_sparse` of the untempered logits) of every
    state ``prompt + response[:t]``, ``t = 0..len(response)``, is kept as a :class:`~tokenrl.data.buffer.TopPCache`:
    the logits of state ``t`` are those step ``t`` samples from, and the state after a row's last token comes
    from the step after it (one extra cached step once every row has ended). The sampled tokens do not depend
    on ``cache_top_p``.
    """
    stepper = KVCacheStepper(model, pad_token_id, vocab_size)
    B = len(prompts)
    lengths_B = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    prompts_BT = torch.full((B, int(lengths_B.max())), pad_token_id, dtype=torch.long)
    for b, prompt in enumerate(prompts):
        prompts_BT[b, : len(prompt)] = torch.as_tensor(list(prompt), dtype=torch.long)
    logits_BV = stepper.start(prompts_BT, lengths_B)
    finished_B = torch.zeros(B, dtype=torch.bool, device=logits_BV.device)
    tokens_steps: list[torch.Tensor] = []
    logprob_steps: list[torch.Tensor] = []
    set_steps: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # per state: sizes [B], ids / logprobs [B, K]
    for step in range(max_new_tokens):
        logprobs_BV = project_to_set(logits_BV)
        cached_set = None
        if cache_top_p is not None:
            cached_set = probed_top_p_sets(logits_BV, logprobs_BV, cache_top_p)
            set_steps.append(cached_set.to_numpy())
        if temperature == 0.0:
            token_B = logits_BV.argmax(-1)
        else:
            # Dividing by 1.0 is exact, so the untempered logits serve as they are (and their log-softmax too).
            scaled_BV = logits_BV if temperature == 1.0 else logits_BV / temperature
            mask_BV = None
            if top_p < 1.0:
                if temperature == 1.0 and top_p == cache_top_p:
                    mask_BV = cached_set.mask(scaled_BV)
                else:
                    scaled_logprobs_BV = logprobs_BV if temperature == 1.0 else project_to_set(scaled_BV)
                    mask_BV = probed_top_p_sets(scaled_BV, scaled_logprobs_BV, top_p).mask(scaled_BV)
            probs_BV = project_to_set(scaled_BV, mask_BV, log=False)
            token_B = torch.multinomial(probs_BV, 1, generator=generator)[:, 0]
        token_B = torch.where(finished_B, torch.full_like(token_B, pad_token_id), token_B)
        tokens_steps.append(token_B)
        logprob_steps.append(logprobs_BV.gather(1, token_B[:, None])[:, 0])
        finished_B = finished_B | (token_B == eos_token_id)
        last_step = bool(finished_B.all()) or step == max_new_tokens - 1
        if last_step and cache_top_p is None:
            break
        logits_BV = stepper.advance(token_B)
        if last_step:
            # The state after the last token.
            set_steps.append(probed_top_p_sets(logits_BV, project_to_set(logits_BV), cache_top_p).to_numpy())
            break
    stepper.stop()

    if not tokens_steps:
        return [[] for _ in range(B)], [[] for _ in range(B)], None
    tokens_BN = torch.stack(tokens_steps, dim=1).cpu()
    logprobs_BN = torch.stack(logprob_steps, dim=1).cpu()
    responses, logprobs = [], []
    for b in range(B):
        row = tokens_BN[b].tolist()
        length = row.index(eos_token_id) + 1 if eos_token_id in row else len(row)
        responses.append(row[:length])
        logprobs.append(logprobs_BN[b, :length].tolist())
    if cache_top_p is None:
        return responses, logprobs, None
    caches = []
    for b, response in enumerate(responses):
        states = set_steps[: len(response) + 1]
        sizes = np.array([sizes_B[b] for sizes_B, _, _ in states], dtype=np.int32)
        ids = np.concatenate([ids_BK[b, :n] for (_, ids_BK, _), n in zip(states, sizes)])
        lps = np.concatenate([lps_BK[b, :n] for (_, _, lps_BK), n in zip(states, sizes)])
        caches.append(TopPCache(sizes=sizes, ids=ids, logprobs=lps))
    return responses, logprobs, caches


def sample_responses(
    model: torch.nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    seed: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 64,
    vocab_size: int | None = None,
    progress: bool = False,
) -> list[list[int]]:
    """Sample a continuation of every prompt from a transformers causal LM.

    A batched loop over :class:`KVCacheStepper` instead of ``model.generate``, so no ``generation_config``
    default (top-k 50, repetition penalty, ...) can change the distribution. Each step samples from
    ``softmax(logits / temperature)`` restricted to its top-p set (:func:`tokenrl.core.top_p.top_p_mask`, the
    same rule as transformers' ``TopPLogitsWarper``). The result is a deterministic function of
    ``seed`` and ``batch_size`` (on a given device).

    Args:
        model: a transformers causal LM (see :class:`KVCacheStepper`).
        prompts: ``N`` non-empty token lists.
        max_new_tokens: the longest response.
        eos_token_id: ends a response; it is kept as the response's last token.
        pad_token_id: fills left padding and finished rows (never attended to / never returned).
        seed: seed of the ``torch.Generator`` that draws the samples.
        temperature: divides the logits; 0 means greedy decoding (``top_p`` is then irrelevant).
        top_p: nucleus threshold in (0, 1].
        batch_size: prompts per forward.
        vocab_size: logits are sliced to ``[:vocab_size]`` so padded embedding rows (``V' > V``) are never
            sampled; None keeps all ``V'``.
        progress: show progress over batches (:func:`tokenrl.core.progress.track`).

    Returns:
        ``N`` responses (token lists of length ``<= max_new_tokens``, ending with EOS iff terminated).
        The model's train/eval mode is restored afterwards.
    """
    if max_new_tokens == 0:
        _check_sampling_args(prompts, max_new_tokens, temperature, top_p, batch_size)
        return [[] for _ in prompts]
    responses, _ = _sample(
        model, prompts, max_new_tokens, eos_token_id, pad_token_id, seed, temperature, top_p, batch_size,
        vocab_size, progress, cache_top_p=None,
    )
    return responses


def _check_sampling_args(prompts, max_new_tokens: int, temperature: float, top_p: float, batch_size: int) -> None:
    check_p(top_p)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    check_prompts(prompts)


def _sample(
    model, prompts, max_new_tokens, eos_token_id, pad_token_id, seed, temperature, top_p, batch_size, vocab_size,
    progress, cache_top_p,
) -> tuple[list[list[int]], list[TopPCache] | None]:
    """The batched sampling loop of :func:`sample_responses` and :meth:`TeacherSampler.with_top_p_cache`."""
    _check_sampling_args(prompts, max_new_tokens, temperature, top_p, batch_size)
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(int(seed))
    starts = range(0, len(prompts), batch_size)
    starts = track(starts, f"sampling (seed {seed})", enabled=progress, unit="batch")
    was_training = model.training
    model.eval()
    responses: list[list[int]] = []
    caches: list[TopPCache] = []
    try:
        with torch.inference_mode():
            for start in starts:
                batch, _, batch_caches = _sample_batch(
                    model,
                    prompts[start : start + batch_size],
                    max_new_tokens,
                    eos_token_id,
                    pad_token_id,
                    generator,
                    temperature,
                    top_p,
                    vocab_size,
                    cache_top_p,
                )
                responses.extend(batch)
                caches.extend(batch_caches or [])
    finally:
        model.train(was_training)
    return responses, (caches if cache_top_p is not None else None)


@dataclass
class TeacherSampler:
    """The offline data's sampler on a transformers teacher: ``sampler(prompts, seed) -> [(response, terminated)]``.

    It implements :class:`tokenrl.tasks.datagen.TopPCachingSampler`: :meth:`with_top_p_cache` also returns the
    teacher's top-p sets from the sampling pass itself, so data generation
    runs the teacher once over the data instead of sampling and then scoring every trajectory again.

    Attributes:
        model: the teacher's causal LM (the same model its :class:`~tokenrl.core.teachers.Teacher` adapter wraps).
        max_new_tokens, eos_token_id, pad_token_id, temperature, top_p, batch_size, vocab_size: as in
            :func:`sample_responses`.
    """

    model: torch.nn.Module
    max_new_tokens: int
    eos_token_id: int
    pad_token_id: int
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 64
    vocab_size: int | None = None

    def _settings(self) -> dict:
        return dict(temperature=self.temperature, top_p=self.top_p, batch_size=self.batch_size, vocab_size=self.vocab_size)

    def _with_flags(self, responses: list[list[int]]) -> list[tuple[list[int], bool]]:
        return [(r, bool(r) and r[-1] == self.eos_token_id) for r in responses]

    def __call__(self, prompts: Sequence[Sequence[int]], seed: int) -> list[tuple[list[int], bool]]:
        """``(response, terminated)`` per prompt."""
        responses = sample_responses(
            self.model, [list(p) for p in prompts], self.max_new_tokens, self.eos_token_id, self.pad_token_id,
            seed, **self._settings(),
        )
        return self._with_flags(responses)

    def with_top_p_cache(
        self, prompts: Sequence[Sequence[int]], seed: int, p: float
    ) -> tuple[list[tuple[list[int], bool]], list[TopPCache]]:
        """The samples of ``self(prompts, seed)`` and the teacher's top-p sets at ``p`` along each.

        The sets are taken from the logits the sampler computes anyway (one cached forward per token, plus one
        step for the state after the last token), at the untempered distribution: they equal
        :func:`tokenrl.tasks.datagen.compute_top_p_cache` of the same model on the responses (a second, teacher-forced
        pass) up to float rounding between the cached and the full forward. Each
        :class:`~tokenrl.data.buffer.TopPCache` has ``len(response) + 1`` states (ids int32, log-probs float16,
        descending probability).
        """
        check_p(p)
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 to cache top-p sets, got {self.max_new_tokens}")
        responses, caches = _sample(
            self.model, [list(pr) for pr in prompts], self.max_new_tokens, self.eos_token_id, self.pad_token_id,
            seed, self.temperature, self.top_p, self.batch_size, self.vocab_size, progress=False, cache_top_p=p,
        )
        return self._with_flags(responses), caches
