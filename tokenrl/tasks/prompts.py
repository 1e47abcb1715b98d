"""Prompt data for real-LM tasks: loading instruction files, the MiniLLM / Bellman Distill template, splits.

A prompt file is JSON Lines, one example per line, in the databricks-dolly-15k layout used by MiniLLM and
BD: ``{"instruction": ..., "context": ..., "response": ...}`` (context and response optional).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

PROMPT_TEMPLATE_WITH_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
"""MiniLLM / BD template for examples with a context."""

PROMPT_TEMPLATE_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
"""The same template without the Input block, for examples whose context is empty."""


@dataclass(frozen=True)
class PromptExample:
    """One instruction example.

    Attributes:
        instruction: the task.
        context: text the task refers to ("" when none).
        response: a reference answer, or None when there is no ground truth.
    """

    instruction: str
    context: str = ""
    response: str | None = None


def _optional_string(record: dict[str, Any], field: str, where: str) -> str | None:
    value = record.get(field)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{where}: field {field!r} must be a string, got {type(value).__name__}.")
    return value


def load_jsonl_prompts(
    path: str,
    instruction_field: str = "instruction",
    context_field: str = "context",
    response_field: str = "response",
) -> list[PromptExample]:
    """Read a JSON Lines prompt file; blank lines are skipped.

    Args:
        path: the ``.jsonl`` file.
        instruction_field: key of the (required, non-empty string) instruction.
        context_field: key of the optional context.
        response_field: key of the optional reference response (empty string -> None).

    Raises:
        ValueError: a line is not UTF-8 or not a JSON object, lacks the instruction, or has a non-string field; the
            message names the file and the 1-based line number.
    """
    examples = []
    with open(path, "rb") as file:
        for line_number, raw in enumerate(file, start=1):
            where = f"{path}:{line_number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(
                    f"{where}: not valid UTF-8 (byte 0x{raw[error.start]:02x} at column {error.start + 1}); "
                    "re-save the file as UTF-8."
                ) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not valid JSON ({error.msg}); each line must be one JSON object.") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}.")
            instruction = _optional_string(record, instruction_field, where)
            if not instruction:
                raise ValueError(
                    f"{where}: missing or empty {instruction_field!r} field (keys present: {sorted(record)}); "
                    f"pass instruction_field= if the file names it differently."
                )
            context = _optional_string(record, context_field, where) or ""
            response = _optional_string(record, response_field, where) or None
            examples.append(PromptExample(instruction, context, response))
    return examples


def load_prompt_list(path: str) -> list[PromptExample]:
    """Read bare prompts: a JSON list of strings, or plain text with one prompt per non-blank line.

    Raises:
        ValueError: a JSON file that is not a list of strings.
    """
    with open(path, encoding="utf-8") as file:
        text = file.read()
    if text.lstrip().startswith("["):
        prompts = json.loads(text)
        if not all(isinstance(prompt, str) for prompt in prompts):
            raise ValueError(f"{path}: a JSON prompt list must contain only strings.")
    else:
        prompts = text.splitlines()
    return [PromptExample(prompt.strip()) for prompt in prompts if prompt.strip()]


def format_prompt(
    example: PromptExample,
    template: str | None = None,
    tokenizer: Any = None,
    use_chat_template: bool = False,
) -> str:
    """The text the models continue: the instruction template, or the tokenizer's chat template.

    Args:
        example: the instruction example.
        template: a format string with ``{instruction}`` and ``{input}`` fields; default: the MiniLLM/BD
            template, with the Input block only when the context is non-empty.
        tokenizer: needed for ``use_chat_template``.
        use_chat_template: render a single user turn (instruction, then the context after a blank line)
            with ``tokenizer.apply_chat_template`` and the generation prompt, for instruct models.
    """
    if use_chat_template:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("use_chat_template=True needs a tokenizer that has a chat_template.")
        content = f"{example.instruction}\n\n{example.context}" if example.context else example.instruction
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    if template is None:
        template = PROMPT_TEMPLATE_WITH_INPUT if example.context else PROMPT_TEMPLATE_NO_INPUT
    return template.format(instruction=example.instruction, input=example.context)


def _split_key(example: PromptExample, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}\0{example.instruction}\0{example.context}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_examples(
    examples: Sequence[PromptExample], val_fraction: float, test_fraction: float, seed: int = 0
) -> tuple[list[PromptExample], list[PromptExample], list[PromptExample]]:
    """Deterministic train/val/test split.

    Examples are ordered by a seeded hash of their text, so the split does not depend on the file order
    and adding a few examples moves few others between splits.

    Args:
        examples: all examples.
        val_fraction: share of validation examples (rounded to a count).
        test_fraction: share of test examples.
        seed: changes the assignment.

    Returns:
        ``(train, val, test)``, each in the input order.
    """
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction > 1:
        raise ValueError(f"Need 0 <= val_fraction, test_fraction and their sum <= 1; got {val_fraction}, {test_fraction}.")
    order = sorted(range(len(examples)), key=lambda i: (_split_key(examples[i], seed), i))
    n_test = round(test_fraction * len(examples))
    n_val = round(val_fraction * len(examples))
    test_ids, val_ids = set(order[:n_test]), set(order[n_test : n_test + n_val])
    train = [e for i, e in enumerate(examples) if i not in test_ids and i not in val_ids]
    val = [e for i, e in enumerate(examples) if i in val_ids]
    test = [e for i, e in enumerate(examples) if i in test_ids]
    return train, val, test
