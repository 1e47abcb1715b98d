"""Loading transformers models and tokenizers (hub id, directory, GGUF) and the shared-vocabulary rule.

Vocabulary rule: teacher and student must share a tokenizer (same id -> token map, same EOS), because the
action space of the token MDP is the vocabulary. Embedding matrices may be padded beyond the tokenizer
(Qwen2.5 has 151,936 rows for 151,665 tokens); those rows are never actions, so every logit tensor leaving
:mod:`tokenrl.lm` is sliced to ``usable_vocab_size`` = ``len(tokenizer)``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from tokenrl.lm.precision import ATTENTION


def with_sdpa(build: Callable[..., PreTrainedModel], *args: Any, **kwargs: Any) -> PreTrainedModel:
    """``build(*args, attn_implementation="sdpa", **kwargs)`` (:data:`tokenrl.lm.precision.ATTENTION`), or
    transformers' default attention for an architecture without SDPA support."""
    try:
        return build(*args, attn_implementation=ATTENTION, **kwargs)
    except ValueError as error:
        if "scaled_dot_product_attention" not in str(error):
            raise
        return build(*args, **kwargs)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A torch dtype from itself or its name (``"bfloat16"``); ValueError on any other name."""
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, dtype, None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"Unknown dtype {dtype!r}; use a torch dtype name such as 'float32' or 'bfloat16'.")
    return resolved


def _load_gguf_model(
    directory: str, gguf_file: str, dtype: torch.dtype, trust_remote_code: bool
) -> PreTrainedModel:
    """A plain (dequantized, trainable) model from a GGUF file, holding about one copy of the weights.

    ``from_pretrained(gguf_file=...)`` requires ``accelerate`` and, for supported architectures, keeps the
    weights packed in untrainable GGUF blocks. Students are trained and teachers are run in a float dtype,
    so we dequantize the file's tensors ourselves (one at a time, into a dict that becomes the model's
    parameters) and load them into a model built on the meta device: no randomly initialised copy is ever
    allocated, so the peak is one float copy of the weights plus the largest tensor being dequantized.
    """
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    from transformers.utils import cached_file

    gguf_path = cached_file(directory, gguf_file)
    config = AutoConfig.from_pretrained(directory, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        skeleton = with_sdpa(AutoModelForCausalLM.from_config, config, dtype=dtype, trust_remote_code=trust_remote_code)
    tensors = load_gguf_checkpoint(gguf_path, return_tensors=True, model_to_load=skeleton, torch_dtype=dtype)["tensors"]
    expected = set(skeleton.state_dict())
    # A GGUF with tied embeddings has no output.weight: lm_head is tied on load, so only it may be missing.
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing, unexpected = expected - set(tensors) - tied, set(tensors) - expected
    if missing or unexpected:
        raise ValueError(
            f"GGUF file {gguf_path} does not match the {type(skeleton).__name__} its metadata describes: "
            f"missing {sorted(missing)}, unexpected {sorted(unexpected)}."
        )
    # from_pretrained with a state dict builds on the meta device and takes the tensors as parameters
    # (no copy); it also materialises non-persistent buffers such as RoPE frequencies, which a plain
    # load_state_dict(assign=True) into the meta skeleton would leave on the meta device.
    return type(skeleton).from_pretrained(
        None, config=config, state_dict=tensors, dtype=dtype, attn_implementation=skeleton.config._attn_implementation
    )


def load_causal_lm(
    name_or_path: str,
    gguf_file: str | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, in eval mode, with SDPA attention where the architecture has it.

    Args:
        name_or_path: a hub id, a local directory saved with ``save_pretrained``, the directory holding
            ``gguf_file``, or a direct path to a ``.gguf`` file.
        gguf_file: file name of a GGUF checkpoint inside ``name_or_path`` (dequantized on load).
        dtype: torch dtype (or its name) of the weights.
        device: where to put the model.
        trust_remote_code: forwarded to transformers (needed by models with custom code).

    Returns:
        ``(model, tokenizer)``. The tokenizer always has a pad token (EOS when it had none), because
        batched teacher calls pad; padding positions are masked, so which id pads does not matter.

    Raises:
        FileNotFoundError: ``name_or_path`` is not a local path and it cannot be fetched (offline mode, or
            a hub id that is neither cached nor downloadable).
    """
    torch_dtype = resolve_dtype(dtype)
    if gguf_file is None and name_or_path.endswith(".gguf") and os.path.isfile(name_or_path):
        name_or_path, gguf_file = os.path.split(os.path.abspath(name_or_path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name_or_path, gguf_file=gguf_file, trust_remote_code=trust_remote_code
        )
        if gguf_file is not None:
            model = _load_gguf_model(name_or_path, gguf_file, torch_dtype, trust_remote_code)
        else:
            model = with_sdpa(
                AutoModelForCausalLM.from_pretrained, name_or_path, dtype=torch_dtype, trust_remote_code=trust_remote_code
            )
    except OSError as error:
        if os.path.exists(name_or_path):
            raise
        where = f"{name_or_path}/{gguf_file}" if gguf_file else name_or_path
        hint = (
            "HF_HUB_OFFLINE=1 forbids downloading it and it is not in the local cache"
            if _offline()
            else "it is neither a local path nor a reachable hub id"
        )
        raise FileNotFoundError(
            f"Cannot load model {where!r}: {hint}. Pass a local directory, a .gguf file path, or a hub id "
            f"already in the cache (or download it first with network access)."
        ) from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


def usable_vocab_size(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> int:
    """Number of actions: ``len(tokenizer)``; embedding rows beyond it are padding and never actions.

    Raises:
        ValueError: the tokenizer has more tokens than the model has output rows.
    """
    rows = model.get_output_embeddings().weight.shape[0]
    size = len(tokenizer)
    if size > rows:
        raise ValueError(
            f"Tokenizer {tokenizer.name_or_path!r} has {size} tokens but model {model.name_or_path!r} only "
            f"{rows} output rows: they do not belong together (call model.resize_token_embeddings(len(tokenizer)) "
            f"if tokens were added on purpose)."
        )
    return size


def check_same_vocabulary(
    teacher_tokenizer: PreTrainedTokenizerBase, student_tokenizer: PreTrainedTokenizerBase
) -> None:
    """Require identical id -> token maps and the same EOS, so both models act on the same action space.

    ``config.vocab_size`` is deliberately not compared: it counts padded embedding rows.

    Raises:
        ValueError: naming both tokenizers and the first token id whose strings differ.
    """
    names = f"teacher tokenizer {teacher_tokenizer.name_or_path!r} and student tokenizer {student_tokenizer.name_or_path!r}"
    teacher_by_id = {i: t for t, i in teacher_tokenizer.get_vocab().items()}
    student_by_id = {i: t for t, i in student_tokenizer.get_vocab().items()}
    for token_id in range(max(len(teacher_by_id), len(student_by_id))):
        teacher_token, student_token = teacher_by_id.get(token_id), student_by_id.get(token_id)
        if teacher_token != student_token:
            raise ValueError(
                f"The {names} differ at token id {token_id}: {teacher_token!r} vs {student_token!r} "
                f"(sizes {len(teacher_by_id)} vs {len(student_by_id)}). Distillation needs one shared "
                f"vocabulary; choose a student from the teacher's model family or build one with "
                f"make_student('fresh' or 'pruned') from the teacher's tokenizer."
            )
    if teacher_tokenizer.eos_token_id != student_tokenizer.eos_token_id:
        raise ValueError(
            f"The {names} have different EOS tokens: {teacher_tokenizer.eos_token!r} (id "
            f"{teacher_tokenizer.eos_token_id}) vs {student_tokenizer.eos_token!r} (id "
            f"{student_tokenizer.eos_token_id}); set the student's eos_token to the teacher's."
        )
