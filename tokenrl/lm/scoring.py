"""Memory-flat scoring: logits only at the positions that are scored, a chunk of positions at a time.

Evaluation and data generation score a right-padded batch of prompt + response sequences at the logit
positions of the response: teacher NLL of the response tokens, teacher-forced KL in both directions, and
the teacher's top-p sets. Dense ``[B, T, V]`` logits over the whole prompt + response width cost
``B * T * V`` floats (several copies once log-softmaxed in float64), which at V = 150k is gigabytes for a
few dozen sequences. Here a causal LM runs its body once, keeps the final hidden states at the scored
positions only (``[N, D]``), and projects them to logits ``chunk`` positions at a time, so the peak is
``chunk * V`` whatever the batch size and sequence length. The default chunk holds
:data:`CHUNK_ELEMENTS` logits, so it is flat in the vocabulary size too.

Positions are given as flat row-major index pairs ``(rows_N, cols_N)`` bundled with their batch in a
:class:`~tokenrl.core.teachers.TokenPositions` (:func:`state_positions`): logit position ``(b, t)`` predicts
token ``t + 1`` of row ``b``. Every function here equals the dense computation to float
tolerance (tests/test_scoring.py keeps the dense reference).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterator

import torch

from tokenrl.core.distributions import kl, project_to_set, token_nll
from tokenrl.data.buffer import Batch
from tokenrl.core.teachers import Teacher, TokenPositions
from tokenrl.core.top_p import TopPSet, top_p_sparse

CHUNK_ELEMENTS = 1 << 22
"""Logits per chunk by default (4M: 16 MB in float32, 32 MB per float64 copy)."""


def chunk_positions(vocab_size: int, chunk: int | None = None) -> int:
    """Positions per chunk: ``chunk``, or as many as fit :data:`CHUNK_ELEMENTS` logits of ``vocab_size``."""
    if chunk is None:
        return max(1, CHUNK_ELEMENTS // max(1, vocab_size))
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 positions, got {chunk}")
    return int(chunk)


def state_positions(
    tokens_BT: torch.Tensor, lengths_B: torch.Tensor, prompt_lens_B: torch.Tensor, n_states_B: torch.Tensor
) -> TokenPositions:
    """Logit positions of the first ``n_states_B[b]`` states after each prompt, row-major.

    The state after the prompt and ``j`` response tokens has its next-token logits at column
    ``prompt_lens_B[b] - 1 + j``. Scoring the ``R`` response tokens uses ``n_states = R``; the top-p cache
    of a trajectory uses its ``R + 1`` states (the last one after the final token).

    Args:
        tokens_BT: right-padded prompt + response ids ``[B, T]``.
        lengths_B: ``[B]`` prompt + response lengths.
        prompt_lens_B: ``[B]`` prompt lengths, each >= 1.
        n_states_B: ``[B]`` states per row, each >= 0.

    Returns:
        The batch with ``rows_N, cols_N`` (long, on the CPU), ``N = n_states_B.sum()``.
    """
    prompt_lens_B, n_states_B = prompt_lens_B.long().cpu(), n_states_B.long().cpu()
    rows_N = torch.repeat_interleave(torch.arange(len(n_states_B)), n_states_B)
    # Offset of each position within its row: position i minus the index where its row starts.
    row_starts_B = torch.cumsum(n_states_B, 0) - n_states_B
    offsets_N = torch.arange(len(rows_N)) - row_starts_B[rows_N]
    return TokenPositions(tokens_BT, lengths_B, rows_N, prompt_lens_B[rows_N] - 1 + offsets_N)


def _check_plain_head(model: torch.nn.Module) -> torch.nn.Module:
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embedding (lm_head); scoring needs a causal LM")
    for unsupported in ("final_logit_softcapping", "logit_scale"):
        if getattr(model.config, unsupported, None):
            raise ValueError(
                f"{type(model).__name__} uses config.{unsupported}; position-chunked scoring assumes "
                "logits = lm_head(final hidden state)"
            )
    return head


def causal_lm_position_logits(
    model: torch.nn.Module,
    at: TokenPositions,
    vocab_size: int | None = None,
    chunk: int | None = None,
    max_batch: int | None = None,
) -> Iterator[torch.Tensor]:
    """Teacher-forced logits of a transformers causal LM at the given positions, chunk by chunk.

    Runs ``model.base_model`` once per ``max_batch`` rows, keeps the final hidden states at
    ``(at.rows_N, at.cols_N)`` and yields ``lm_head`` of ``chunk`` of them at a time. Call it under
    ``torch.no_grad`` (or ``inference_mode``).

    Args:
        model: a transformers causal LM whose logits are ``lm_head(base_model(...)[0])`` (Llama family,
            GPT-2, Qwen2, ...).
        at: the right-padded batch and its positions (padding is masked out by ``at.lengths_B``).
        vocab_size: logits are sliced to ``[:vocab_size]`` (drops padded embedding rows); None keeps all.
        chunk: positions per yielded block; None sizes it by :func:`chunk_positions`.
        max_batch: rows per body forward; None runs all rows at once.

    Yields:
        ``[n, V]`` logits in the model's dtype on its device, ``n <= chunk``, in the order of the positions.
    """
    head = _check_plain_head(model)
    device = head.weight.device
    batch, width = at.tokens_BT.shape
    step = batch if max_batch is None else max_batch
    positions_T = torch.arange(width, device=device)
    rows_N, cols_N = at.rows_N.to(device), at.cols_N.to(device)
    hidden: list[torch.Tensor] = []
    for start in range(0, batch, max(step, 1)):
        in_group_N = (rows_N >= start) & (rows_N < start + step)
        if not bool(in_group_N.any()):
            continue
        tokens_bT = at.tokens_BT[start : start + step].to(device)
        lengths_b = at.lengths_B[start : start + step].to(device)
        attention_mask_bT = (positions_T[None, :] < lengths_b[:, None]).long()
        out = model.base_model(
            input_ids=tokens_bT,
            attention_mask=attention_mask_bT,
            position_ids=positions_T.expand_as(tokens_bT),
            use_cache=False,
        )
        h_bTD = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        hidden.append(h_bTD[rows_N[in_group_N] - start, cols_N[in_group_N]])
    if not hidden:
        return
    h_ND = torch.cat(hidden)
    size = chunk_positions(vocab_size or head.weight.shape[0], chunk)
    for start in range(0, h_ND.shape[0], size):
        yield head(h_ND[start : start + size])[..., :vocab_size]


def teacher_response_nll(
    teacher: Teacher,
    tokens_BT: torch.Tensor,
    lengths_B: torch.Tensor,
    prompt_lens_B: torch.Tensor,
    chunk: int | None = None,
) -> torch.Tensor:
    """Teacher NLL of every response token, ``-log softmax(logits)[token]`` in float64.

    Args:
        teacher: any :class:`~tokenrl.core.teachers.Teacher`.
        tokens_BT: right-padded prompt + response ids ``[B, T]``.
        lengths_B: ``[B]`` prompt + response lengths.
        prompt_lens_B: ``[B]`` prompt lengths (>= 1); the response is ``tokens_BT[b, P:lengths_B[b]]``.
        chunk: positions per logit block (None: :func:`chunk_positions`).

    Returns:
        ``[N]`` float64 NLLs of the response tokens, row-major (row ``b`` contributes ``lengths - P``).
    """
    at = state_positions(tokens_BT, lengths_B, prompt_lens_B, lengths_B - prompt_lens_B)
    targets_N = tokens_BT.cpu()[at.rows_N, at.cols_N + 1]
    size = chunk_positions(teacher.vocab_size, chunk)
    # Results go into a preallocated tensor: small per-chunk tensors kept alive between the large chunk
    # temporaries fragment glibc's heap, and the process then grows with the number of chunks.
    nll_N = torch.zeros(len(at), dtype=torch.float64)
    done = 0
    for logits_nV in teacher.position_logits(at, size):
        n = logits_nV.shape[0]
        logits_nV = logits_nV.double()
        target_n = targets_N[done : done + n].to(logits_nV.device)
        nll_N[done : done + n] = token_nll(logits_nV, target_n).cpu()
        done += n
    return nll_N


def kl_both_directions(
    model: torch.nn.Module,
    teacher: Teacher,
    tokens_BT: torch.Tensor,
    lengths_B: torch.Tensor,
    prompt_lens_B: torch.Tensor,
    vocab_size: int | None = None,
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced KL(student || teacher) and KL(teacher || student) at every response position.

    Both distributions are log-softmaxed in float64 over the full (shared) vocabulary; terms with zero
    probability contribute 0 (not ``0 * -inf``), so ``-inf`` logits are allowed.

    Args:
        model: the student, a transformers causal LM (see :func:`causal_lm_position_logits`), in eval mode.
        teacher: a :class:`~tokenrl.core.teachers.Teacher` over the same vocabulary.
        tokens_BT: right-padded prompt + response ids ``[B, T]``.
        lengths_B: ``[B]`` prompt + response lengths.
        prompt_lens_B: ``[B]`` prompt lengths (>= 1).
        vocab_size: student logits are sliced to ``[:vocab_size]``; None uses ``teacher.vocab_size``.
        chunk: positions per logit block (None: :func:`chunk_positions`).

    Returns:
        ``(kl_student_teacher_N, kl_teacher_student_N)``, ``[N]`` float64 each, row-major over the
        response positions.

    Raises:
        ValueError: student and teacher logits differ in width after slicing.
    """
    vocab = teacher.vocab_size if vocab_size is None else vocab_size
    at = state_positions(tokens_BT, lengths_B, prompt_lens_B, lengths_B - prompt_lens_B)
    size = chunk_positions(vocab, chunk)
    student = causal_lm_position_logits(model, at, vocab, size)
    teacher_chunks = teacher.position_logits(at, size)
    # Preallocated results (see teacher_response_nll).
    kl_st_N = torch.zeros(len(at), dtype=torch.float64)
    kl_ts_N = torch.zeros(len(at), dtype=torch.float64)
    done = 0
    for student_nV, teacher_nV in zip(student, teacher_chunks):
        if student_nV.shape[-1] != teacher_nV.shape[-1]:
            raise ValueError(
                f"student has {student_nV.shape[-1]} logits after slicing to vocab_size={vocab}, "
                f"teacher has {teacher_nV.shape[-1]}; they must share a vocabulary"
            )
        logp_s_nV = project_to_set(student_nV.double())
        logp_t_nV = project_to_set(teacher_nV.to(student_nV.device).double())
        n = student_nV.shape[0]
        kl_st_N[done : done + n] = kl(logp_s_nV, logp_t_nV).cpu()
        kl_ts_N[done : done + n] = kl(logp_t_nV, logp_s_nV).cpu()
        done += n
    return kl_st_N, kl_ts_N


def top_p_sets(
    teacher: Teacher,
    tokens_BT: torch.Tensor,
    lengths_B: torch.Tensor,
    prompt_lens_B: torch.Tensor,
    p: float,
    max_k: int | None = None,
    pad_id: int = 0,
    chunk: int | None = None,
) -> Iterator[TopPSet]:
    """The teacher's top-p sets at the ``R + 1`` states of every trajectory, chunk by chunk.

    State ``j`` of row ``b`` is the prefix prompt + ``response[:j]``, ``j = 0..R`` (the last one follows the
    final response token).

    Args:
        teacher: any :class:`~tokenrl.core.teachers.Teacher`.
        tokens_BT: right-padded prompt + response ids ``[B, T]``.
        lengths_B: ``[B]`` prompt + response lengths.
        prompt_lens_B: ``[B]`` prompt lengths (>= 1).
        p: top-p threshold.
        max_k: optional cap on set sizes (see :func:`tokenrl.core.top_p.top_p_sparse`).
        pad_id: id in padding slots of the sets.
        chunk: positions per logit block (None: :func:`chunk_positions`).

    Yields:
        :class:`~tokenrl.core.top_p.TopPSet` of ``[n, K]`` tensors for consecutive row-major states (K varies
        between chunks).
    """
    at = state_positions(tokens_BT, lengths_B, prompt_lens_B, lengths_B - prompt_lens_B + 1)
    size = chunk_positions(teacher.vocab_size, chunk)
    for logits_nV in teacher.position_logits(at, size):
        yield top_p_sparse(logits_nV, p, max_k=max_k, pad_id=pad_id)


def with_teacher_logprobs(batch: Batch, teacher: Teacher, pad_id: int, chunk: int | None = None) -> Batch:
    """``batch`` with ``teacher_logprobs_BSV``: the teacher's full-vocabulary log-probs at all its states.

    The teacher sees each row as ``prompt + response`` right-padded (the :class:`~tokenrl.core.teachers.Teacher`
    layout) and is scored at the ``R + 1`` states of every row (:func:`state_positions`), a chunk at a time;
    the result is ``B * S * V`` floats, the size of the student's dense logits on the same batch.

    Args:
        batch: a :class:`~tokenrl.data.buffer.Batch` (left-padded prompts, right-padded responses).
        teacher: any :class:`~tokenrl.core.teachers.Teacher` over the student's vocabulary.
        pad_id: id written into the teacher input's padding.
        chunk: positions per logit block (None: :func:`chunk_positions`).

    Returns:
        A copy of ``batch`` whose ``teacher_logprobs_BSV`` is ``[B, S, V]`` float32 on the batch's device
        (``-log V``, the uniform distribution, at padded states).
    """
    P, device = batch.prompt_width, batch.input_ids_BL.device
    prompt_lens_B = batch.attention_mask_BL[:, :P].sum(1)
    lengths_B = prompt_lens_B + batch.lengths_B
    # Left-padded prompt -> right-padded sequence: row b starts at column P - prompt_len_b.
    L = batch.input_ids_BL.shape[1]
    cols_BL = torch.arange(L, device=device)[None, :]
    src_BL = (cols_BL + (P - prompt_lens_B)[:, None]).clamp(max=L - 1)
    tokens_BL = batch.input_ids_BL.gather(1, src_BL).masked_fill(cols_BL >= lengths_B[:, None], pad_id)
    at = state_positions(tokens_BL, lengths_B, prompt_lens_B, batch.lengths_B + 1)
    rows_N = at.rows_N
    S, V = batch.state_mask_BS.shape[1], teacher.vocab_size
    out_BSV = torch.full((len(lengths_B), S, V), -math.log(V), dtype=torch.float32, device=device)
    states_N = at.cols_N - (prompt_lens_B.cpu()[rows_N] - 1)
    start = 0
    for logits_nV in teacher.position_logits(at, chunk_positions(V, chunk)):
        n = logits_nV.shape[0]
        rows, states = rows_N[start : start + n].to(device), states_N[start : start + n].to(device)
        out_BSV[rows, states] = project_to_set(logits_nV.float()).to(device)
        start += n
    return dataclasses.replace(batch, teacher_logprobs_BSV=out_BSV)
