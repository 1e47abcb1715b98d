"""The student's on-policy reverse KL: how far from the teacher the student is on its *own* samples.

Definition (per token, ratio of expectations): for responses y ~ pi_s(.|x) on evaluation prompts x,

    KL_on = E_{x, y ~ pi_s}[ sum_t (log pi_s(y_t|s_t) - log pi_t(y_t|s_t)) ] / E_{x, y ~ pi_s}[ |y| ]
          = KL(pi_s(y|x) || pi_t(y|x)) / E|y|                (sequence-level reverse KL per generated token).

Its Monte-Carlo estimate (:func:`on_policy_reverse_kl`) is the sum of ``log pi_s - log pi_t`` over all
sampled tokens divided by their number (consistent; exact in expectation up to the ratio's O(1/N) bias).
Averaging the exact per-state KL(pi_s(.|s_t) || pi_t(.|s_t)) over the same sampled states has the same
limit with less variance: that is ``teacher_forced_kl(model, teacher, prompts, student_samples)`` of
:mod:`tokenrl.evaluation.metrics`, reported next to it by :func:`on_policy_reverse_kl_of_model`. The gap between
KL_on and the teacher-forced KL on *teacher* samples is the exposure-bias effect.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from tokenrl.lm import scoring
from tokenrl.core.distributions import project_to_set
from tokenrl.core.padding import right_pad
from tokenrl.core.teachers import Teacher
from tokenrl.core.top_p import check_p, top_p_mask


def on_policy_reverse_kl(
    student_logp_BT: torch.Tensor, teacher_logp_BT: torch.Tensor, mask_BT: torch.Tensor
) -> float:
    """Per-token on-policy reverse KL from log-probs of the student's sampled tokens.

    Args:
        student_logp_BT: ``[B, T]`` student log-probs of its own sampled tokens.
        teacher_logp_BT: ``[B, T]`` teacher log-probs of the same tokens.
        mask_BT: ``[B, T]`` bool, True on real response tokens.

    Returns:
        ``sum(mask * (student - teacher)) / sum(mask)`` (NaN when there is no token).
    """
    mask = mask_BT.bool()
    n = int(mask.sum())
    if n == 0:
        return float("nan")
    diff = (student_logp_BT.double() - teacher_logp_BT.double())[mask]
    return float(diff.sum() / n)


def student_token_logprobs(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad_token_id: int,
    top_p: float = 1.0,
    batch_size: int = 64,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's log-probs of every response token, teacher-forced on prompt + response.

    Args:
        model: the student, a transformers causal LM.
        prompts: ``N`` non-empty token lists.
        responses: ``N`` token lists (the student's samples).
        pad_token_id: id in the right padding of each batch (masked out).
        top_p: the student's sampling top-p: its log-probs are those of its distribution projected onto its
            own top-p set (the distribution the samples came from); 1.0 = unrestricted.
        batch_size: sequences per forward.
        vocab_size: logits are sliced to ``[:vocab_size]``; None keeps all.

    Returns:
        ``(logp_NL, mask_NL)``: float64 ``[N, L]`` (L = longest response, 0 on padding) and bool, True on
        the response tokens.
    """
    check_p(top_p)
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
    width_L = max((len(r) for r in responses), default=0)
    logp_out = torch.zeros(len(prompts), width_L, dtype=torch.float64)
    mask_out = torch.zeros(len(prompts), width_L, dtype=torch.bool)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(prompts), batch_size):
                rows = range(start, min(start + batch_size, len(prompts)))
                tokens_BT, lengths_B = right_pad([list(prompts[i]) + list(responses[i]) for i in rows], pad_token_id)
                prompt_lens_B = torch.tensor([len(prompts[i]) for i in rows], dtype=torch.long)
                response_lens_B = torch.tensor([len(responses[i]) for i in rows], dtype=torch.long)
                # Only the response positions, a chunk of logits at a time (memory-flat in batch x length x V).
                at = scoring.state_positions(tokens_BT, lengths_B, prompt_lens_B, response_lens_B)
                rows_N, cols_N = at.rows_N, at.cols_N
                tokens_N = tokens_BT[rows_N, cols_N + 1]
                logp_N = torch.zeros(len(rows_N), dtype=torch.float64)
                done = 0
                for logits_nV in scoring.causal_lm_position_logits(model, at, vocab_size):
                    logits_nV = logits_nV.double()
                    n = logits_nV.shape[0]
                    logp_nV = project_to_set(logits_nV, top_p_mask(logits_nV, top_p) if top_p < 1.0 else None)
                    targets_n1 = tokens_N[done : done + n, None].to(logp_nV.device)
                    logp_N[done : done + n] = logp_nV.gather(1, targets_n1)[:, 0].cpu()
                    done += n
                slots_N = cols_N - (prompt_lens_B[rows_N] - 1)
                out_rows_N = torch.as_tensor(list(rows))[rows_N]
                logp_out[out_rows_N, slots_N] = logp_N
                mask_out[out_rows_N, slots_N] = True
    finally:
        model.train(was_training)
    return logp_out, mask_out


def on_policy_reverse_kl_of_model(
    model: torch.nn.Module,
    teacher: Teacher,
    prompts: list[list[int]],
    max_new_tokens: int,
    pad_token_id: int,
    seed: int,
    top_p: float = 1.0,
    batch_size: int = 64,
    vocab_size: int | None = None,
) -> dict[str, float]:
    """Sample the student at temperature 1 and report its on-policy reverse KL, sampled and per-state exact.

    Returns:
        ``{"eval/onpolicy_kl": ..., "eval/onpolicy_kl_exact_state": ...}``: the sampled-token estimate of
        :func:`on_policy_reverse_kl`, and the full-vocabulary per-state KL averaged over the same sampled
        states (same expectation, lower variance; unrestricted student, so it equals the first only at
        ``top_p = 1``).
    """
    from tokenrl.evaluation.teacher_forced import teacher_forced_kl, teacher_nll
    from tokenrl.lm.sampling import sample_responses

    responses = sample_responses(
        model, prompts, max_new_tokens, teacher.eos_token_id, pad_token_id, seed,
        top_p=top_p, batch_size=batch_size, vocab_size=vocab_size,
    )
    vocab = teacher.vocab_size if vocab_size is None else vocab_size
    s_logp, mask = student_token_logprobs(model, prompts, responses, teacher.eos_token_id, top_p, batch_size, vocab)
    nll_per_response = teacher_nll(teacher, prompts, responses, batch_size)
    t_logp = torch.zeros_like(s_logp)
    if nll_per_response:
        # The mask is row-major over the response tokens, the order of the concatenated per-response NLLs.
        t_logp[mask] = -torch.from_numpy(np.concatenate(nll_per_response))
    exact = teacher_forced_kl(model, teacher, prompts, responses, batch_size, vocab_size)["kl_student_teacher"]
    return {"eval/onpolicy_kl": on_policy_reverse_kl(s_logp, t_logp, mask), "eval/onpolicy_kl_exact_state": exact}
