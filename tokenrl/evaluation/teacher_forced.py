"""Teacher-forced scores of given responses: the teacher's NLL of them, KL between student and teacher in both
directions, and where the student puts its mass relative to the teacher's top-p set.

Logits are computed only at the response positions, a chunk of positions at a time (:mod:`tokenrl.lm.scoring`),
in float64. :mod:`tokenrl.evaluation.metrics` combines them with sampled responses into the evaluation.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Sequence

import numpy as np
import torch

from tokenrl.core.distributions import entropy, kl, project_to_set, soft_value
from tokenrl.core.padding import right_pad
from tokenrl.core.teachers import Teacher
from tokenrl.core.top_p import top_p_mask
from tokenrl.lm import scoring
from tokenrl.lm.sampling import check_prompts

def check_pairs(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]) -> None:
    """One response per prompt, and valid prompts (ValueError otherwise)."""
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
    check_prompts(prompts)

def teacher_nll(
    teacher: Teacher, prompts: list[list[int]], responses: list[list[int]], batch_size: int = 64
) -> list[np.ndarray]:
    """Exact teacher NLL of every response token given the prompt and the previous response tokens.

    Args:
        teacher: any :class:`tokenrl.core.teachers.Teacher` (its logits at the response positions are
            log-softmaxed here in float64, a chunk at a time: see :func:`tokenrl.lm.scoring.teacher_response_nll`).
        prompts: ``N`` non-empty token lists.
        responses: ``N`` token lists (may be empty).
        batch_size: sequences per ``teacher.position_logits`` call.

    Returns:
        ``N`` float64 arrays, array ``i`` of shape ``[len(responses[i])]``.
    """
    check_pairs(prompts, responses)
    out: list[np.ndarray] = []
    with torch.inference_mode():
        for tokens_BT, lengths_B, prompt_lens_B, response_lens_B in padded_batches(
            prompts, responses, batch_size, teacher
        ):
            nll_N = scoring.teacher_response_nll(teacher, tokens_BT, lengths_B, prompt_lens_B).numpy()
            out.extend(np.split(nll_N, np.cumsum(response_lens_B.numpy())[:-1]))
    return out

def padded_batches(
    prompts: list[list[int]], responses: list[list[int]], batch_size: int, teacher: Teacher
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(tokens_BT, lengths_B, prompt_lens_B, response_lens_B)`` of prompt + response, ``batch_size`` rows at a time.

    Rows are right-padded with the teacher's EOS (padding is masked out by ``lengths_B``).
    """
    for start in range(0, len(prompts), batch_size):
        batch_prompts, batch_responses = prompts[start : start + batch_size], responses[start : start + batch_size]
        tokens_BT, lengths_B = right_pad(
            [list(p) + list(r) for p, r in zip(batch_prompts, batch_responses)], teacher.eos_token_id
        )
        prompt_lens_B = torch.tensor([len(p) for p in batch_prompts], dtype=torch.long)
        response_lens_B = torch.tensor([len(r) for r in batch_responses], dtype=torch.long)
        yield tokens_BT, lengths_B, prompt_lens_B, response_lens_B


def teacher_forced_kl(
    model: torch.nn.Module,
    teacher: Teacher,
    prompts: list[list[int]],
    responses: list[list[int]],
    batch_size: int = 64,
    vocab_size: int | None = None,
) -> dict[str, float]:
    """Teacher-forced KL between student and teacher, mean per response token, over the full vocabulary.

    Both models read the same prefixes (prompt + the given response tokens) and are compared at every
    response position (logits only at those positions, a chunk at a time: see
    :func:`tokenrl.lm.scoring.kl_both_directions`):

    * ``kl_student_teacher`` = KL(student || teacher) = sum_v pi_s(v) (log pi_s(v) - log pi_t(v)), the
      "reverse KL" of the distillation literature (mode seeking; MiniLLM's objective);
    * ``kl_teacher_student`` = KL(teacher || student), the "forward KL" (mass covering; word-level KD).

    Args:
        model: the student, a transformers causal LM whose logits are ``lm_head(base_model(...))``.
        teacher: a :class:`tokenrl.core.teachers.Teacher` over the same vocabulary.
        prompts: ``N`` non-empty token lists.
        responses: ``N`` token lists, typically held-out teacher samples.
        batch_size: sequences per forward.
        vocab_size: student logits are sliced to ``[:vocab_size]``; None uses ``teacher.vocab_size``.

    Returns:
        ``{"kl_student_teacher": float, "kl_teacher_student": float}`` (NaN if there are no response
        tokens). The model's train/eval mode is restored afterwards.
    """
    check_pairs(prompts, responses)
    vocab = teacher.vocab_size if vocab_size is None else vocab_size
    total_st, total_ts, n_tokens = 0.0, 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for tokens_BT, lengths_B, prompt_lens_B, _ in padded_batches(prompts, responses, batch_size, teacher):
                kl_st_N, kl_ts_N = scoring.kl_both_directions(
                    model, teacher, tokens_BT, lengths_B, prompt_lens_B, vocab
                )
                total_st += float(kl_st_N.sum())
                total_ts += float(kl_ts_N.sum())
                n_tokens += len(kl_st_N)
    finally:
        model.train(was_training)
    if n_tokens == 0:
        return {"kl_student_teacher": float("nan"), "kl_teacher_student": float("nan")}
    return {"kl_student_teacher": total_st / n_tokens, "kl_teacher_student": total_ts / n_tokens}


SET_METRIC_KEYS = (
    "mass_outside_set", "kl_teacher_student_on_set", "kl_set_teacher_student", "student_entropy", "teacher_entropy"
)
"""Keys of :func:`set_metrics_per_token` and :func:`teacher_forced_set_metrics`."""


def set_metrics_per_token(
    student_logits_NV: torch.Tensor, teacher_logits_NV: torch.Tensor, set_top_p: float
) -> dict[str, torch.Tensor]:
    """Where the student puts its mass relative to the teacher's top-p set, at each of ``N`` states.

    A pure function of one chunk of logits, so that a chunked teacher-forced pass can call it on the
    response positions it already computes.

    Args:
        student_logits_NV: ``[N, V]`` student logits (any float dtype; computed in float64).
        teacher_logits_NV: ``[N, V]`` teacher logits (or log-probabilities) at the same states.
        set_top_p: p of the teacher's top-p set (the task's ``cache_top_p``: the set the TD methods train on).

    Returns:
        ``[N]`` float64 tensors keyed by :data:`SET_METRIC_KEYS`:

        * ``mass_outside_set``: ``1 - sum_{a in set} pi_s(a)``;
        * ``kl_teacher_student_on_set``: KL(teacher || student) with both projected onto the set (how well the
          student ranks the tokens inside it, whatever mass it leaves outside);
        * ``kl_set_teacher_student``: KL(teacher projected onto the set || student over the full vocabulary),
          ``= kl_teacher_student_on_set - log(1 - mass_outside_set)``. When the offline data is sampled at
          top-p ``set_top_p`` this is the gap BC closes: the student's cross-entropy on such data minus the
          top-p teacher's entropy (0 iff the student equals the top-p teacher);
        * ``student_entropy``, ``teacher_entropy``: entropies over the full vocabulary.
    """
    set_NV = top_p_mask(teacher_logits_NV, set_top_p)
    logp_s_NV = project_to_set(student_logits_NV.double())
    logp_t_NV = project_to_set(teacher_logits_NV.double())
    logp_t_set_NV = project_to_set(logp_t_NV, set_NV)
    return {
        # -expm1(log mass inside) keeps precision when almost all mass is inside.
        "mass_outside_set": -torch.expm1(soft_value(logp_s_NV, set_NV)),
        "kl_teacher_student_on_set": kl(logp_t_set_NV, project_to_set(logp_s_NV, set_NV), set_NV),
        "kl_set_teacher_student": kl(logp_t_set_NV, logp_s_NV, set_NV),
        "student_entropy": entropy(logp_s_NV),
        "teacher_entropy": entropy(logp_t_NV),
    }


def teacher_forced_set_metrics(
    model: torch.nn.Module,
    teacher: Teacher,
    prompts: list[list[int]],
    responses: list[list[int]],
    set_top_p: float,
    batch_size: int = 64,
    vocab_size: int | None = None,
) -> dict[str, float]:
    """:func:`set_metrics_per_token`, mean per response token, teacher-forced on ``prompts`` + ``responses``.

    Args:
        model: the student, a transformers causal LM.
        teacher: a :class:`tokenrl.core.teachers.Teacher` over the same vocabulary.
        prompts: ``N`` non-empty token lists.
        responses: ``N`` token lists, typically held-out teacher samples.
        set_top_p: p of the teacher's top-p set.
        batch_size: sequences per forward.
        vocab_size: student logits are sliced to ``[:vocab_size]``; None uses ``teacher.vocab_size``.

    Returns:
        The :data:`SET_METRIC_KEYS` as floats (NaN if there are no response tokens). The model's train/eval
        mode is restored afterwards.
    """
    check_pairs(prompts, responses)
    vocab = teacher.vocab_size if vocab_size is None else vocab_size
    totals = dict.fromkeys(SET_METRIC_KEYS, 0.0)
    n_tokens = 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for tokens_BT, lengths_B, prompt_lens_B, response_lens_B in padded_batches(
                prompts, responses, batch_size, teacher
            ):
                # Only the response positions, a chunk of logits at a time (memory-flat, see tokenrl.lm.scoring).
                at = scoring.state_positions(tokens_BT, lengths_B, prompt_lens_B, response_lens_B)
                size = scoring.chunk_positions(vocab)
                student_chunks = scoring.causal_lm_position_logits(model, at, vocab, size)
                teacher_chunks = teacher.position_logits(at, size)
                for student_nV, teacher_nV in zip(student_chunks, teacher_chunks):
                    if student_nV.shape[-1] != teacher_nV.shape[-1]:
                        raise ValueError(
                            f"student has {student_nV.shape[-1]} logits after slicing to vocab_size={vocab}, "
                            f"teacher has {teacher_nV.shape[-1]}; they must share a vocabulary"
                        )
                    per_token = set_metrics_per_token(student_nV, teacher_nV.to(student_nV.device), set_top_p)
                    for key, values_N in per_token.items():
                        totals[key] += float(values_N.sum())
                n_tokens += len(at)
    finally:
        model.train(was_training)
    return {key: (total / n_tokens if n_tokens else float("nan")) for key, total in totals.items()}
