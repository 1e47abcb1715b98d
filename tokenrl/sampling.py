"""The generation engine: lock-step next-token logits of a transformers causal LM, with or without a KV cache.

One stepper serves every place that generates: the evaluation's and the data generation's sampler
(:func:`sample_responses`), and the env rollouts of students and teachers
(:class:`tokenrl.models.IncrementalTeacher`). Rows are left-padded so that every row's next token appends at
the same column, with positions counting real tokens only, so a padded row sees what an unpadded one would.
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch

from tokenrl.backup import project_to_set
from tokenrl.top_p import check_p, top_p_mask


def cache_keyword(model: torch.nn.Module) -> str:
    """The forward kwarg / output field that carries the KV cache in this transformers version.

    transformers 5.2x renamed ``past_key_values`` to ``cache`` (the old name warns, and is removed in 5.40).
    """
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def left_pad(tokens_BT: torch.Tensor, lengths_B: torch.Tensor, pad_token_id: int) -> tuple[torch.Tensor, ...]:
    """Move right-padded rows to the right edge so every row's last real token sits in the last column.

    Args:
        tokens_BT: right-padded token ids ``[B, T]``.
        lengths_B: real tokens per row ``[B]``, each in ``1..T``.
        pad_token_id: id written into the padding.

    Returns:
        ``(tokens_BL, attention_mask_BL, position_ids_BL)`` with ``L = max(lengths_B)``; positions count
        real tokens from 0 (0 on padding).
    """
    lengths_B = lengths_B.to(tokens_BT.device)
    if int(lengths_B.min()) < 1:
        raise ValueError("Every row needs at least one real token (lengths_B >= 1); start prompts with BOS if empty.")
    width = int(lengths_B.max())
    columns_L = torch.arange(width, device=tokens_BT.device)
    shift_B1 = (width - lengths_B).unsqueeze(1)
    attention_mask_BL = columns_L.unsqueeze(0) >= shift_B1
    source_BL = (columns_L.unsqueeze(0) - shift_B1).clamp(min=0)
    tokens_BL = torch.where(attention_mask_BL, tokens_BT[:, :width].gather(1, source_BL), pad_token_id)
    position_ids_BL = torch.where(attention_mask_BL, source_BL, 0)
    return tokens_BL, attention_mask_BL.long(), position_ids_BL


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
) -> tuple[list[list[int]], list[list[float]]]:
    """Sample one batch with a KV cache; also return each sampled token's log-prob.

    The log-probs are under the model's untempered, untruncated distribution (log-softmax of the logits
    sliced to ``vocab_size``); tests compare them with a slow no-cache forward.
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
    for step in range(max_new_tokens):
        logprobs_BV = project_to_set(logits_BV)
        if temperature == 0.0:
            token_B = logits_BV.argmax(-1)
        else:
            scaled_BV = logits_BV / temperature
            mask_BV = top_p_mask(scaled_BV, top_p) if top_p < 1.0 else None
            probs_BV = project_to_set(scaled_BV, mask_BV, log=False)
            token_B = torch.multinomial(probs_BV, 1, generator=generator)[:, 0]
        token_B = torch.where(finished_B, torch.full_like(token_B, pad_token_id), token_B)
        tokens_steps.append(token_B)
        logprob_steps.append(logprobs_BV.gather(1, token_B[:, None])[:, 0])
        finished_B = finished_B | (token_B == eos_token_id)
        if bool(finished_B.all()) or step == max_new_tokens - 1:
            break
        logits_BV = stepper.advance(token_B)
    stepper.stop()

    if not tokens_steps:
        return [[] for _ in range(B)], [[] for _ in range(B)]
    tokens_BN = torch.stack(tokens_steps, dim=1).cpu()
    logprobs_BN = torch.stack(logprob_steps, dim=1).cpu()
    responses, logprobs = [], []
    for b in range(B):
        row = tokens_BN[b].tolist()
        length = row.index(eos_token_id) + 1 if eos_token_id in row else len(row)
        responses.append(row[:length])
        logprobs.append(logprobs_BN[b, :length].tolist())
    return responses, logprobs


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
    ``softmax(logits / temperature)`` restricted to its top-p set (:func:`tokenrl.top_p.top_p_mask`, the
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
        progress: show a tqdm bar over batches.

    Returns:
        ``N`` responses (token lists of length ``<= max_new_tokens``, ending with EOS iff terminated).
        The model's train/eval mode is restored afterwards.
    """
    check_p(top_p)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    check_prompts(prompts)
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(int(seed))
    starts = range(0, len(prompts), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"sampling (seed {seed})", unit="batch")
    was_training = model.training
    model.eval()
    responses: list[list[int]] = []
    try:
        with torch.inference_mode():
            for start in starts:
                batch, _ = _sample_batch(
                    model,
                    prompts[start : start + batch_size],
                    max_new_tokens,
                    eos_token_id,
                    pad_token_id,
                    generator,
                    temperature,
                    top_p,
                    vocab_size,
                )
                responses.extend(batch)
    finally:
        model.train(was_training)
    return responses
