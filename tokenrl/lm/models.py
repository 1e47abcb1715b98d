"""Transformers adapters: building students and the teacher interface (loading: :mod:`tokenrl.lm.loading`).

Everything a real-LM task needs from transformers goes through this file and :mod:`tokenrl.lm.loading`: the
algorithms and the env wrapper only see :class:`tokenrl.core.teachers.Teacher` (here :class:`HFTeacher`) and
plain ``nn.Module`` students whose logits index the same vocabulary as the teacher's (the vocabulary rule of
:mod:`tokenrl.lm.loading`).
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from typing import Any, Iterator

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from tokenrl.core.files import apply_umask_to_tree
from tokenrl.lm.loading import check_same_vocabulary, load_causal_lm, resolve_dtype, usable_vocab_size, with_sdpa
from tokenrl.lm.sampling import KVCacheStepper
from tokenrl.lm.scoring import causal_lm_position_logits
from tokenrl.core.teachers import TokenPositions

FRESH_STUDENT_DEFAULTS: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
}
"""Config of a ``make_student("fresh")`` model unless overridden: a small Llama (~3M params + embeddings)."""


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The stack of decoder blocks: ``model.model.layers`` (Llama family) or ``model.transformer.h`` (GPT-2)."""
    base = model.base_model
    for attribute in ("layers", "h"):
        layers = getattr(base, attribute, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ValueError(
        f"Cannot find the decoder blocks of {type(model).__name__}: supported are Llama-family models "
        f"(model.model.layers) and GPT-2 (model.transformer.h)."
    )


def _prune_layers(teacher_model: PreTrainedModel, keep_every: int) -> PreTrainedModel:
    """Deep copy of the teacher keeping decoder blocks 0, k, 2k, ... and always the last one."""
    if keep_every < 1:
        raise ValueError(f"keep_every must be >= 1, got {keep_every}.")
    student = copy.deepcopy(teacher_model)
    layers = decoder_layers(student)
    n_layers = len(layers)
    kept = sorted(set(range(0, n_layers, keep_every)) | {n_layers - 1})
    new_layers = nn.ModuleList(layers[i] for i in kept)
    # The KV cache is indexed by each attention module's layer_idx, which must now count 0..n_kept-1.
    for new_index, block in enumerate(new_layers):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    base = student.base_model
    setattr(base, "layers" if isinstance(getattr(base, "layers", None), nn.ModuleList) else "h", new_layers)
    config = student.config
    # Per-layer lists (layer_types, sliding-window flags, ...) are read by index in forward and on reload.
    for key, value in list(config.to_dict().items()):
        if isinstance(value, list) and len(value) == n_layers and key != "architectures":
            setattr(config, key, [value[i] for i in kept])
    config.num_hidden_layers = len(kept)
    return student


def make_student(
    kind: str,
    teacher_model: PreTrainedModel | None = None,
    teacher_tokenizer: PreTrainedTokenizerBase | None = None,
    name_or_path: str | None = None,
    config_overrides: dict[str, Any] | None = None,
    keep_every: int = 2,
    gguf_file: str | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    seed: int = 0,
    gradient_checkpointing: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Build a student that shares the teacher's vocabulary, in train mode: the one student constructor.

    Fresh and pretrained students use SDPA attention where the architecture has it; a pruned one keeps the
    teacher's attention implementation.

    Args:
        kind: ``"pretrained"`` (load ``name_or_path``/``gguf_file``), ``"fresh"`` (random init from
            :data:`FRESH_STUDENT_DEFAULTS` updated by ``config_overrides``; ``model_type`` picks the
            architecture; the vocabulary and special ids come from ``teacher_tokenizer``, or from
            ``config_overrides`` for a teacher without a tokenizer such as the synthetic language) or ``"pruned"`` (copy of ``teacher_model`` keeping every ``keep_every``-th decoder
            block and the last one, with its embeddings, final norm and head).
        teacher_model: required for ``"pruned"``.
        teacher_tokenizer: required for ``"pruned"`` and for ``"fresh"`` unless ``config_overrides`` has
            ``vocab_size``; checked against a pretrained student's.
        name_or_path: required for ``"pretrained"``.
        config_overrides: config fields of a fresh student.
        keep_every: pruning stride.
        gguf_file: GGUF file of a pretrained student.
        dtype: weight dtype.
        device: where to put the student.
        seed: torch seed of a fresh student's initialisation.
        gradient_checkpointing: recompute the decoder blocks' activations in the backward pass (transformers'
            ``gradient_checkpointing_enable``, non-reentrant) instead of keeping them from the forward: training
            memory drops by the blocks' activations for about one extra forward pass; loss and gradients are
            unchanged (the students have no dropout to re-draw).

    Returns:
        ``(student, tokenizer)``; the tokenizer is the teacher's (None without one) unless ``kind == "pretrained"``.
    """
    torch_dtype = resolve_dtype(dtype)
    if kind == "pretrained":
        if name_or_path is None:
            raise ValueError("make_student('pretrained') needs name_or_path (a hub id, directory or .gguf path).")
        student, tokenizer = load_causal_lm(name_or_path, gguf_file=gguf_file, dtype=torch_dtype, device=device)
        if teacher_tokenizer is not None:
            check_same_vocabulary(teacher_tokenizer, tokenizer)
    elif kind == "fresh":
        tokenizer = teacher_tokenizer
        vocabulary = {} if tokenizer is None else {
            "vocab_size": len(tokenizer),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
        fields = {**FRESH_STUDENT_DEFAULTS, **vocabulary, **(config_overrides or {})}
        if "vocab_size" not in fields:
            raise ValueError(
                "make_student('fresh') needs teacher_tokenizer (or config_overrides['vocab_size'] and the special "
                "token ids): the student's vocabulary is the teacher's."
            )
        config = AutoConfig.for_model(fields.pop("model_type"), **fields)
        torch.manual_seed(seed)
        student = with_sdpa(AutoModelForCausalLM.from_config, config, dtype=torch_dtype).to(device)
    elif kind == "pruned":
        if teacher_model is None or teacher_tokenizer is None:
            raise ValueError("make_student('pruned') needs teacher_model and teacher_tokenizer.")
        tokenizer = teacher_tokenizer
        student = _prune_layers(teacher_model, keep_every).to(device=device, dtype=torch_dtype)
    else:
        raise ValueError(f"Unknown student kind {kind!r}; use 'pretrained', 'fresh' or 'pruned'.")
    if gradient_checkpointing:
        if not student.supports_gradient_checkpointing:
            raise ValueError(
                f"{type(student).__name__} does not support gradient checkpointing; set model.gradient_checkpointing=false"
            )
        # Non-reentrant: works when the block inputs do not require grad (frozen embeddings) and with DDP.
        # transformers 5 renamed gradient_checkpointing_enable (deprecated there) to activation_checkpointing_enable.
        if hasattr(student, "activation_checkpointing_enable"):
            student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return student.train(), tokenizer


def save_student(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str) -> None:
    """Save model (safetensors) and tokenizer so ``load_causal_lm(out_dir)`` loads them as they are.

    The files are written to a temporary directory next to ``out_dir`` and renamed into place, so a crash
    mid-save never leaves a half-written checkpoint under ``out_dir``; an existing ``out_dir`` is replaced.
    """
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        apply_umask_to_tree(staging)  # mkdtemp makes it 0700 and safetensors its weights 0600
        if os.path.exists(out_dir):
            # A directory cannot be renamed over a non-empty one: move the old one aside first.
            retired = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
            os.replace(out_dir, os.path.join(retired, "checkpoint"))
            os.replace(staging, out_dir)
            shutil.rmtree(retired)
        else:
            os.replace(staging, out_dir)
    finally:
        if os.path.exists(staging):
            shutil.rmtree(staging)


class HFTeacher:
    """:class:`tokenrl.core.teachers.Teacher` on a transformers causal LM.

    ``stepper`` (:class:`tokenrl.lm.sampling.KVCacheStepper`) is its KV-cached lock-step path, used through
    :class:`IncrementalTeacher`. All calls run under ``torch.no_grad`` (not ``inference_mode``: teacher logits become loss targets, and
    inference tensors cannot be saved for backward) with the model in eval mode. Returned logits are
    float32, on the device of the input tokens, and sliced to ``vocab_size``.

    Args:
        model: the causal LM.
        tokenizer: its tokenizer (defines ``vocab_size`` and ``eos_token_id``).
        max_batch: rows per forward pass in :meth:`sequence_logits` (bounds the ``[B, T, V]`` activation) and
            :meth:`position_logits` (bounds the body's activations).
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_batch: int = 8):
        if tokenizer.eos_token_id is None:
            raise ValueError(f"Tokenizer {tokenizer.name_or_path!r} has no EOS token; set tokenizer.eos_token.")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.vocab_size = usable_vocab_size(model, tokenizer)
        self.eos_token_id = int(tokenizer.eos_token_id)
        self.pad_token_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_id)
        self.max_batch = max_batch
        # The shared generation engine: uncached next-token logits here, lock-step KV-cache steps for
        # IncrementalTeacher.
        self.stepper = KVCacheStepper(model, self.pad_token_id, self.vocab_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def next_token_logits(self, tokens_BT: torch.Tensor, lengths_B: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, V]`` of the token after the first ``lengths_B[b]`` tokens of each right-padded row."""
        return self.stepper.next_token_logits(tokens_BT, lengths_B).to(tokens_BT.device)

    @torch.no_grad()
    def sequence_logits(self, tokens_BT: torch.Tensor, lengths_B: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits ``[B, T, V]``: entry ``t`` predicts token ``t + 1`` from ``tokens_BT[b, : t + 1]``.

        Entries at ``t >= lengths_B[b]`` are unspecified. Runs ``max_batch`` rows per forward pass.
        """
        batch, width = tokens_BT.shape
        positions_T = torch.arange(width, device=self.device)
        chunks = []
        for start in range(0, batch, self.max_batch):
            tokens_bT = tokens_BT[start : start + self.max_batch].to(self.device)
            lengths_b = lengths_B[start : start + self.max_batch].to(self.device)
            attention_mask_bT = (positions_T.unsqueeze(0) < lengths_b.unsqueeze(1)).long()
            logits_bTV = self.model(
                input_ids=tokens_bT,
                attention_mask=attention_mask_bT,
                position_ids=positions_T.expand_as(tokens_bT),
                use_cache=False,
            ).logits
            chunks.append(logits_bTV[..., : self.vocab_size].float().to(tokens_BT.device))
        return torch.cat(chunks)

    @torch.no_grad()
    def position_logits(self, at: TokenPositions, chunk: int) -> Iterator[torch.Tensor]:
        """Teacher-forced logits ``[n, V]`` at the positions of ``at``, ``chunk`` positions at a time.

        Equals ``sequence_logits(...)[at.rows_N, at.cols_N]``: the body runs once per ``max_batch`` rows and
        only the requested positions are projected to the vocabulary (see
        :func:`tokenrl.lm.scoring.causal_lm_position_logits`).
        """
        for logits_nV in causal_lm_position_logits(self.model, at, self.vocab_size, chunk, self.max_batch):
            yield logits_nV.float().to(at.tokens_BT.device)


class IncrementalTeacher:
    """The Teacher interface on :class:`HFTeacher`'s KV cache, for lock-step rollouts in the batched env.

    :meth:`next_token_logits` keeps the previous call's prefixes: when every row of the new call extends its
    previous prefix by at most one token (the batched env's lock-step; finished rows stop growing) it feeds
    only the new tokens through the teacher's :class:`~tokenrl.lm.sampling.KVCacheStepper` (``advance``). Any other
    call restarts it (``start``). So ``envs.top_p_restricted_policy`` and ``TopPActionWrapper`` run one cached
    teacher step per env step. A row that stops growing (it finished) is fed padding from then on; its logits
    are meaningless and the env ignores them. ``sequence_logits`` and ``position_logits`` are the uncached
    adapter's own.

    Args:
        teacher: the uncached adapter.
    """

    def __init__(self, teacher: HFTeacher):
        self.teacher = teacher
        self.vocab_size = teacher.vocab_size
        self.eos_token_id = teacher.eos_token_id
        self.pad_token_id = teacher.pad_token_id
        # Teacher-forced scoring involves no cache: the uncached adapter's methods serve as they are.
        self.sequence_logits = teacher.sequence_logits
        self.position_logits = teacher.position_logits
        self._prev_tokens_BT: torch.Tensor | None = None
        self._prev_lengths_B: torch.Tensor | None = None
        self._active_B: torch.Tensor | None = None

    def _extends_previous(self, tokens_BT: torch.Tensor, lengths_B: torch.Tensor) -> bool:
        prev_t, prev_l = self._prev_tokens_BT, self._prev_lengths_B
        if prev_t is None or prev_l.shape != lengths_B.shape:
            return False
        grow = lengths_B - prev_l
        if not bool(((grow == 0) | (grow == 1)).all()) or bool((grow[~self._active_B] != 0).any()):
            return False  # a row that stopped growing (finished) has a stale cache column and cannot resume
        width = int(prev_l.max())
        if tokens_BT.shape[1] < width:
            return False
        mask = torch.arange(width)[None, :] < prev_l[:, None]
        return bool((tokens_BT[:, :width][mask] == prev_t[:, :width][mask]).all())

    def next_token_logits(self, tokens_BT: torch.Tensor, lengths_B: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``[B, V]`` with the KV cache when the call continues the previous one."""
        tokens_BT, lengths_B = tokens_BT.cpu(), lengths_B.cpu().long()
        if self._extends_previous(tokens_BT, lengths_B):
            grow = lengths_B - self._prev_lengths_B
            last = tokens_BT.gather(1, (lengths_B - 1).clamp_min(0)[:, None])[:, 0]
            with torch.no_grad():
                logits = self.teacher.stepper.advance(torch.where(grow == 1, last, torch.full_like(last, self.pad_token_id)))
            self._active_B = self._active_B & (grow == 1)
        else:
            with torch.no_grad():
                logits = self.teacher.stepper.start(tokens_BT, lengths_B)
            self._active_B = torch.ones_like(lengths_B, dtype=torch.bool)
        self._prev_tokens_BT, self._prev_lengths_B = tokens_BT.clone(), lengths_B.clone()
        return logits.to(tokens_BT.device)

