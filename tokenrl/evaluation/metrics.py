"""Evaluation of students against a teacher: sampled-response metrics and teacher-forced KL (the teacher-forced
scores themselves are in :mod:`tokenrl.evaluation.teacher_forced`).

The protocol follows MiniLLM / DistiLLM / Bellman Distill (notes, section 5): sample a response for every
evaluation prompt at temperature 1 (top-p 1.0 as in MiniLLM, 0.8 as in the BD release) with several
sampling seeds, score the samples with Rouge-L against reference responses, and average over seeds.
Because our teachers expose exact next-token distributions we also report

* the teacher's NLL per response token of the student's samples (how likely the teacher finds what the
  student writes; the teacher's own samples give the floor, its entropy rate), and its value at each
  response position (the exposure-bias curve: errors compound along free-running generations);
* teacher-forced KL between student and teacher on held-out (teacher) responses, in both directions, and
  where the student puts its mass relative to the teacher's top-p set (:func:`~tokenrl.evaluation.teacher_forced.teacher_forced_set_metrics`):
  its mass outside the set, the KL restricted to the set, and both entropies.

Students can be decoded at several top-p values side by side (:func:`evaluate_decodings`): the first gives the
``eval/...`` keys, each other one ``eval_p<p>/...`` keys.

Metric keys are namespaced ``eval/...``; see :func:`evaluate`. Standard deviations are sample standard
deviations (``ddof=1``) over sampling seeds, 0.0 for a single seed.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from rouge_score import rouge_scorer

from tokenrl.core.teachers import Teacher
from tokenrl.evaluation.teacher_forced import teacher_forced_kl, teacher_forced_set_metrics, teacher_nll
from tokenrl.lm.sampling import sample_responses

Decode = Callable[[list[int]], str]
Sampler = Callable[[list[list[int]], int], list[list[int]]]

_ROUGE_SCORER: rouge_scorer.RougeScorer | None = None


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def rouge_l(predictions: list[str], references: list[list[str]]) -> float:
    """Corpus Rouge-L F-measure x 100: per prediction the best F over its references, then the mean.

    Uses ``rouge_score``'s ``rougeL`` with Porter stemming (the MiniLLM / DistiLLM protocol).

    Args:
        predictions: ``N`` generated texts.
        references: ``N`` non-empty lists of reference texts.
    """
    global _ROUGE_SCORER
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        raise ValueError("rouge_l needs at least one prediction")
    if _ROUGE_SCORER is None:
        _ROUGE_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = []
    for i, (prediction, refs) in enumerate(zip(predictions, references)):
        if not refs:
            raise ValueError(f"prediction {i} has no references")
        scores.append(max(_ROUGE_SCORER.score(ref, prediction)["rougeL"].fmeasure for ref in refs))
    return 100.0 * float(np.mean(scores))


# --------------------------------------------------------------------------------------------------
# Full evaluation
# --------------------------------------------------------------------------------------------------
def _sampled_response_metrics(
    teacher: Teacher,
    prompts: list[list[int]],
    references: list[list[str]] | None,
    decode: Decode,
    responses_per_seed: list[list[list[int]]],
    eos_token_id: int,
    batch_size: int,
) -> dict[str, float | list[float]]:
    """Metrics of one set of responses per sampling seed (shared by students and the teacher)."""
    nll_means, rouges, lengths, eos_rates = [], [], [], []
    max_len = max((len(r) for responses in responses_per_seed for r in responses), default=0)
    position_sum_L = np.zeros(max_len)
    position_count_L = np.zeros(max_len)
    for responses in responses_per_seed:
        nll_arrays = teacher_nll(teacher, prompts, responses, batch_size)
        all_nll = np.concatenate(nll_arrays)
        nll_means.append(float(all_nll.mean()) if all_nll.size else float("nan"))
        for nll in nll_arrays:
            position_sum_L[: len(nll)] += nll
            position_count_L[: len(nll)] += 1
        if references is not None:
            rouges.append(rouge_l([decode(r) for r in responses], references))
        lengths.append(float(np.mean([len(r) for r in responses])))
        eos_rates.append(float(np.mean([bool(r) and r[-1] == eos_token_id for r in responses])))

    metrics: dict[str, float | list[float]] = {}
    metrics["eval/teacher_nll"], metrics["eval/teacher_nll_std_seeds"] = _mean_std(nll_means)
    if references is not None:
        metrics["eval/rougeL"], metrics["eval/rougeL_std_seeds"] = _mean_std(rouges)
    metrics["eval/response_len"] = _mean_std(lengths)[0]
    metrics["eval/eos_rate"] = _mean_std(eos_rates)[0]
    # Every position up to max_len is reached by at least one response, so no count is zero.
    metrics["eval/nll_by_position"] = (position_sum_L / position_count_L).tolist()
    metrics["eval/nll_by_position_count"] = position_count_L.tolist()
    return metrics


def _check_eval_inputs(prompts: list[list[int]], references: list[list[str]] | None, seeds: Sequence[int]) -> None:
    if not prompts:
        raise ValueError("evaluation needs at least one prompt")
    if references is not None and len(references) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(references)} reference lists")
    if len(seeds) == 0:
        raise ValueError("evaluation needs at least one sampling seed")


def evaluate(
    model: torch.nn.Module,
    teacher: Teacher,
    prompts: list[list[int]],
    references: list[list[str]] | None,
    decode: Decode,
    *,
    eos_token_id: int,
    pad_token_id: int,
    max_new_tokens: int,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    temperature: float = 1.0,
    top_p: float = 1.0,
    heldout: tuple[list[list[int]], list[list[int]]] | None = None,
    set_top_p: float | None = None,
    batch_size: int = 64,
    vocab_size: int | None = None,
    progress: bool = False,
) -> dict[str, float | list[float]]:
    """Evaluate a student: sample with every seed, score with the teacher and Rouge-L, plus teacher-forced metrics.

    Args:
        model: the student (see :func:`tokenrl.lm.sampling.sample_responses`).
        teacher: the exact teacher that scores the samples.
        prompts: ``N`` non-empty evaluation prompts.
        references: ``N`` lists of reference texts for Rouge-L, or None to skip Rouge-L.
        decode: token list -> text for Rouge-L (``SyntheticLanguage.token_to_text``, a tokenizer's decode).
        eos_token_id: ends a response.
        pad_token_id: pads prompts and finished rows.
        max_new_tokens: the longest response.
        seeds: one sampling pass per seed; scalar metrics are averaged over seeds.
        temperature: sampling temperature (0 = greedy).
        top_p: sampling top-p threshold.
        heldout: ``(prompts, responses)`` for the teacher-forced metrics (e.g. teacher samples on held-out
            prompts); None skips them.
        set_top_p: p of the teacher's top-p set for :func:`teacher_forced_set_metrics` on ``heldout``; None
            skips them.
        batch_size: sequences per forward.
        vocab_size: student logits are sliced to ``[:vocab_size]``; None uses ``teacher.vocab_size``.
        progress: show progress while sampling (:func:`tokenrl.core.progress.track`).

    Returns:
        A flat dict:

        * ``eval/teacher_nll``: teacher NLL per sampled response token (token-weighted within a seed,
          averaged over seeds); ``eval/teacher_nll_std_seeds`` its std over seeds;
        * ``eval/rougeL``, ``eval/rougeL_std_seeds``: Rouge-L F x 100 (only if ``references`` is given);
        * ``eval/response_len``: mean response length in tokens (EOS included);
        * ``eval/eos_rate``: fraction of responses that ended with EOS before ``max_new_tokens``;
        * ``eval/kl_student_teacher``, ``eval/kl_teacher_student``: teacher-forced KLs on ``heldout``
          (see :func:`teacher_forced_kl`; only if ``heldout`` is given);
        * ``eval/<key>`` for each of :data:`~tokenrl.evaluation.teacher_forced.SET_METRIC_KEYS`: :func:`teacher_forced_set_metrics` on ``heldout``
          (only if ``heldout`` and ``set_top_p`` are given);
        * ``eval/nll_by_position`` (list): mean teacher NLL at response position ``t`` over all seeds
          and responses that reach it, and ``eval/nll_by_position_count`` (list) the number of tokens
          behind each entry.
    """
    _check_eval_inputs(prompts, references, seeds)
    vocab = teacher.vocab_size if vocab_size is None else vocab_size
    responses_per_seed = [
        sample_responses(
            model,
            prompts,
            max_new_tokens,
            eos_token_id,
            pad_token_id,
            seed,
            temperature=temperature,
            top_p=top_p,
            batch_size=batch_size,
            vocab_size=vocab,
            progress=progress,
        )
        for seed in seeds
    ]
    metrics = _sampled_response_metrics(
        teacher, prompts, references, decode, responses_per_seed, eos_token_id, batch_size
    )
    if heldout is not None:
        heldout_prompts, heldout_responses = heldout
        kl = teacher_forced_kl(model, teacher, heldout_prompts, heldout_responses, batch_size, vocab)
        metrics["eval/kl_student_teacher"] = kl["kl_student_teacher"]
        metrics["eval/kl_teacher_student"] = kl["kl_teacher_student"]
        if set_top_p is not None:
            set_metrics = teacher_forced_set_metrics(
                model, teacher, heldout_prompts, heldout_responses, set_top_p, batch_size, vocab
            )
            metrics.update({f"eval/{k}": v for k, v in set_metrics.items()})
    return metrics


def evaluate_teacher_samples(
    teacher: Teacher,
    prompts: list[list[int]],
    references: list[list[str]] | None,
    decode: Decode,
    sampler: Sampler,
    *,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    batch_size: int = 64,
) -> dict[str, float | list[float]]:
    """The metrics of :func:`evaluate` for the teacher's own samples, the reference row of a report.

    The teacher NLL of its own samples estimates its entropy rate, the floor no student can beat in
    expectation. The KL keys are exactly 0 (the teacher against itself) and are reported as such.

    Args:
        teacher: the teacher (scores the samples; its ``eos_token_id`` ends responses).
        prompts: ``N`` non-empty evaluation prompts.
        references: ``N`` lists of reference texts for Rouge-L, or None to skip Rouge-L.
        decode: token list -> text for Rouge-L.
        sampler: ``sampler(prompts, seed) -> N responses`` drawing from the teacher with the same
            temperature / top-p / max_new_tokens as the students, e.g. a wrapper of
            ``SyntheticLanguage.sample_continuations`` that drops the ``terminated`` flags.
        seeds: one sampling pass per seed.
        batch_size: sequences per teacher call.

    Returns:
        The keys of :func:`evaluate`, with both KL keys equal to 0.0.
    """
    _check_eval_inputs(prompts, references, seeds)
    responses_per_seed = []
    for seed in seeds:
        responses = [list(r) for r in sampler(prompts, seed)]
        if len(responses) != len(prompts):
            raise ValueError(f"sampler returned {len(responses)} responses for {len(prompts)} prompts")
        responses_per_seed.append(responses)
    metrics = _sampled_response_metrics(
        teacher, prompts, references, decode, responses_per_seed, teacher.eos_token_id, batch_size
    )
    metrics["eval/kl_student_teacher"] = 0.0
    metrics["eval/kl_teacher_student"] = 0.0
    return metrics


def decoding_prefix(index: int, top_p: float) -> str:
    """Metric namespace of the ``index``-th student decoding: ``eval`` for the first, ``eval_p<top_p>`` after."""
    return "eval" if index == 0 else f"eval_p{top_p:g}"


def evaluate_decodings(
    *args,
    decode_top_p: Sequence[float],
    heldout: tuple[list[list[int]], list[list[int]]] | None = None,
    **kwargs,
) -> dict[str, float | list[float]]:
    """:func:`evaluate` at several student decoding top-p values.

    The sampled metrics of ``decode_top_p[0]`` keep the ``eval/...`` keys; those of every other value ``q``
    are the same keys under ``eval_p<q>/...`` (e.g. ``eval_p0.8/rougeL``). The teacher-forced metrics on
    ``heldout`` do not depend on decoding and are computed once, with the first decoding (``eval/...``).

    Args:
        *args: the positional arguments of :func:`evaluate` (``model, teacher, prompts, references, decode``).
        decode_top_p: the student's sampling top-p values, at least one.
        heldout: as in :func:`evaluate`.
        **kwargs: the other keyword arguments of :func:`evaluate` (``eos_token_id``, ``seeds``, ``set_top_p``, ...).

    Returns:
        One flat dict with every decoding's keys.
    """
    if not decode_top_p:
        raise ValueError("eval.decode_top_p needs at least one top-p value, e.g. [1.0] or [1.0, 0.8]")
    metrics: dict[str, float | list[float]] = {}
    for i, top_p in enumerate(decode_top_p):
        one = evaluate(*args, top_p=top_p, heldout=heldout if i == 0 else None, **kwargs)
        prefix = decoding_prefix(i, top_p)
        metrics.update({f"{prefix}/{k.removeprefix('eval/')}": v for k, v in one.items()})
    return metrics
