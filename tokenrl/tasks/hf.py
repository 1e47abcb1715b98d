"""Real-LM tasks: a transformers teacher, instruction prompts, references and samplers, built from a config.

``task.kind == "hf"`` configs (schema :class:`HFTaskConfig`, e.g. ``task=smollm2``, ``task=dolly_gpt2``) come
here through :func:`tokenrl.run.inputs.build_task`. The pieces are the ones of
:func:`tokenrl.tasks.base.build_synthetic_task`:

* prompts: a Dolly-style JSONL file, rendered with the MiniLLM/BD template or the tokenizer's chat template,
  split deterministically (:func:`tokenrl.tasks.prompts.split_examples`) before tokenisation so the split does not
  depend on the teacher; prompts longer than ``max_prompt_tokens`` are then dropped and counted;
* references (Rouge-L): the ground-truth response where the file has one, plus ``n_references`` teacher
  samples drawn at the teacher's own settings (top-p 1.0, temperature 1), like the teacher's evaluation
  samples, so neither changes with the students' decoding settings;
* samplers: batched KV-cache sampling of the teacher (:func:`tokenrl.lm.sampling.sample_responses`); the offline
  data's sampler (:class:`tokenrl.lm.sampling.TeacherSampler`) keeps the teacher's top-p sets of its own sampling
  pass, so data generation runs the teacher once.

* the pre-training corpus (:mod:`tokenrl.tasks.corpus`, built only for algorithms with an LM term on it):
  ``corpus_file`` (JSONL or text), or the teacher's own unconditional samples.

Teacher samples needed at build time (references, the held-out KL responses) cost as much as a short data
generation on a real teacher, so they are cached as JSON under ``eval_cache_dir`` when it is set.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tokenrl.core.options import NON_NEGATIVE, OPEN_UNIT, POSITIVE, PROBABILITY, field_problems
from tokenrl.data.buffer import write_json_atomic
from tokenrl.tasks.manifest import file_sha256
from tokenrl.lm.loading import load_causal_lm
from tokenrl.lm.models import HFTeacher
from tokenrl.tasks.prompts import PromptExample, format_prompt, load_jsonl_prompts, split_examples
from tokenrl.lm.sampling import TeacherSampler, sample_responses
from tokenrl.tasks.base import Task
from tokenrl.tasks.corpus import hf_corpus

TEMPLATES = ("minillm", "chat")
"""``minillm``: the MiniLLM/BD instruction template; ``chat``: ``tokenizer.apply_chat_template``."""

# Seed offsets (added to data_seed * 1_000_003, the base of the offline data's shard seeds) keep the
# reference and held-out draws apart from the offline data and from the evaluation draws (10_000 + seed).
_REFERENCE_SEED_OFFSET = 500_000
_HELDOUT_SEED_OFFSET = 600_000
_TEST_HELDOUT_SEED_OFFSET = 700_000
_EVAL_SEED_OFFSET = 10_000


@dataclass
class HFTaskConfig:
    """A transformers-teacher task; the schema of ``task=smollm2``, ``task=dolly_gpt2``, ``task=dolly_qwen``."""

    name: str = "hf"
    kind: str = "hf"  # selects this schema and builder
    teacher: str = "???"  # hub id, local directory, or directory holding the GGUF file
    teacher_gguf_file: str | None = None  # GGUF file name inside ``teacher`` (or a direct path)
    teacher_dtype: str = "float32"  # teacher parameter dtype
    prompts_file: str = "???"  # Dolly-style JSONL (instruction, context, response)
    instruction_field: str = "instruction"
    context_field: str = "context"
    response_field: str = "response"
    template: str = "minillm"  # minillm (the MiniLLM/BD template) | chat (tokenizer.apply_chat_template)
    max_prompt_tokens: int = 256  # longer prompts are dropped (counted in metrics)
    max_new_tokens: int = 128  # response budget
    val_fraction: float = 0.05
    test_fraction: float = 0.1
    max_train_prompts: int | None = None  # cap the number of training prompts (None = all)
    max_val_prompts: int | None = None  # cap the number of validation prompts (held-out KL, val_every)
    max_test_prompts: int | None = None  # cap the number of evaluation prompts
    samples_per_prompt: int = 1  # teacher samples per training prompt (the paper uses 8)
    sample_top_p: float = 0.8  # teacher sampling top-p for the offline data (= training p)
    sample_temperature: float = 1.0
    cache_top_p: float = 0.8  # p of the stored teacher top-p sets
    cache_max_k: int | None = None  # optional cap on cached set sizes
    n_references: int = 1  # held-out teacher answers per test prompt used as references (plus ground truth)
    data_seed: int = 1234  # seed of the prompt split and the teacher data
    shard_prompts: int = 64  # prompts per data shard
    cache_batch_size: int = 8  # sequences per teacher forward in the cache pass
    gen_batch_size: int = 16  # prompts per teacher sampling batch
    eval_cache_dir: str | None = None  # cache of the build-time teacher samples (references, held-out KL); None = off
    # Pre-training corpus (tokenrl.tasks.corpus), built only for algorithms with an LM term on it:
    corpus_file: str | None = None  # JSONL (text in corpus_text_field) or text file (a document per line); None = the teacher's unconditional samples
    corpus_text_field: str = "text"  # JSONL field holding a document's text
    corpus_sequences: int = 256  # rows of the corpus (the first documents of the file, or teacher samples)
    corpus_max_tokens: int = 128  # tokens per row after the document separator (BOS, else EOS)

    def problems(self, prefix: str = "task") -> list[str]:
        """Every field out of its range or choices and every missing required field, one line each."""
        ranges = {
            "max_prompt_tokens": POSITIVE, "max_new_tokens": POSITIVE, "val_fraction": OPEN_UNIT,
            "test_fraction": OPEN_UNIT, "max_train_prompts": POSITIVE.explained("null = all"),
            "max_val_prompts": POSITIVE.explained("null = all"), "max_test_prompts": POSITIVE.explained("null = all"),
            "samples_per_prompt": POSITIVE, "sample_top_p": PROBABILITY, "sample_temperature": POSITIVE,
            "cache_top_p": PROBABILITY, "cache_max_k": POSITIVE.explained("null = no cap"), "n_references": NON_NEGATIVE,
            "data_seed": NON_NEGATIVE, "shard_prompts": POSITIVE, "cache_batch_size": POSITIVE, "gen_batch_size": POSITIVE,
            "corpus_sequences": POSITIVE, "corpus_max_tokens": POSITIVE,
        }
        found = field_problems(self, prefix, ranges, choices={"template": TEMPLATES})
        for required in ("teacher", "prompts_file"):
            if getattr(self, required) in (None, "???"):
                found.append(f"{prefix}.{required} is not set: the hf task needs it (see tokenrl.tasks.hf.HFTaskConfig)")
        fractions = (self.val_fraction, self.test_fraction)
        if all(OPEN_UNIT.ok(f) for f in fractions) and sum(fractions) >= 1:
            found.append(
                f"{prefix}.val_fraction + {prefix}.test_fraction = {sum(fractions)} leaves no training prompt; lower "
                "one of them"
            )
        return found


def _check(cfg: HFTaskConfig) -> None:
    problems = cfg.problems()
    if problems:
        raise ValueError("invalid task config:\n  " + "\n  ".join(problems))


def _tokenize_prompts(examples: Sequence[PromptExample], tokenizer, template: str) -> list[list[int]]:
    if template == "chat":
        # The chat template already writes the special tokens (BOS, role markers); adding them again
        # would put a second BOS in front.
        texts = [format_prompt(e, tokenizer=tokenizer, use_chat_template=True) for e in examples]
        return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    # MiniLLM/BD tokenise the templated text with the tokenizer's defaults (GPT-2: no BOS; Llama: BOS).
    return [tokenizer(format_prompt(e))["input_ids"] for e in examples]


def _keep_short(
    examples: list[PromptExample], prompts: list[list[int]], max_tokens: int, cap: int | None
) -> tuple[list[PromptExample], list[list[int]], int]:
    """Drop empty and over-long prompts, then cap the count; returns the number dropped for length."""
    kept = [(e, p) for e, p in zip(examples, prompts) if 0 < len(p) <= max_tokens]
    dropped = len(examples) - len(kept)
    kept = kept[:cap] if cap is not None else kept
    return [e for e, _ in kept], [p for _, p in kept], dropped


def weights_sha256(model) -> str:
    """SHA-256 of a model's parameter and buffer bytes in ``state_dict`` order (about 1 s per GB)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _tokens_digest(prompts: Sequence[Sequence[int]]) -> str:
    return hashlib.sha1(json.dumps([list(p) for p in prompts]).encode()).hexdigest()[:16]


def build_hf_task(cfg: HFTaskConfig, device: str = "cpu") -> Task:
    """Build a transformers-teacher task from a ``task=<hf task>`` config.

    Args:
        cfg: the task settings.
        device: where the teacher runs (the run's ``device``; ``cuda:<local rank>`` under torchrun).

    Returns:
        The :class:`~tokenrl.tasks.base.Task`. ``task.teacher`` is an :class:`~tokenrl.lm.models.HFTeacher` (its
        ``.model`` is what a ``pruned`` student copies) and ``task.tokenizer`` the teacher's tokenizer.

    Raises:
        ValueError: missing settings, or no prompt left in a split after the length filter.
        FileNotFoundError: the teacher or the prompts file cannot be found.
    """
    _check(cfg)
    # The prompt file is read before the teacher is loaded, so a bad file fails at once.
    if not os.path.isfile(cfg.prompts_file):
        raise FileNotFoundError(f"task.prompts_file {cfg.prompts_file!r} does not exist (cwd {os.getcwd()}).")
    examples = load_jsonl_prompts(
        cfg.prompts_file, cfg.instruction_field, cfg.context_field, cfg.response_field
    )
    model, tokenizer = load_causal_lm(cfg.teacher, gguf_file=cfg.teacher_gguf_file, dtype=cfg.teacher_dtype, device=device)
    teacher = HFTeacher(model, tokenizer, max_batch=int(cfg.cache_batch_size))
    eos, pad, vocab = teacher.eos_token_id, teacher.pad_token_id, teacher.vocab_size
    max_new = int(cfg.max_new_tokens)
    gen_batch = int(cfg.gen_batch_size)
    splits = split_examples(examples, cfg.val_fraction, cfg.test_fraction, cfg.data_seed)
    caps = (cfg.max_train_prompts, cfg.max_val_prompts, cfg.max_test_prompts)
    kept, dropped = [], {}
    for split_name, split, cap in zip(("train", "val", "test"), splits, caps):
        kept_examples, kept_prompts, dropped[split_name] = _keep_short(
            split, _tokenize_prompts(split, tokenizer, cfg.template), int(cfg.max_prompt_tokens), cap
        )
        if not kept_prompts:
            raise ValueError(
                f"No {split_name} prompt left in {cfg.prompts_file} (split {len(split)}, "
                f"{dropped[split_name]} longer than max_prompt_tokens={cfg.max_prompt_tokens}); "
                f"raise the split fraction or max_prompt_tokens."
            )
        kept.append((kept_examples, kept_prompts))
    (_, train), (val_examples, val), (test_examples, test) = kept

    def sample(prompts: Sequence[Sequence[int]], seed: int, top_p: float, temperature: float) -> list[list[int]]:
        return sample_responses(
            teacher.model, [list(p) for p in prompts], max_new, eos, pad, seed,
            temperature=temperature, top_p=top_p, batch_size=gen_batch, vocab_size=vocab,
        )

    data_sampler = TeacherSampler(
        teacher.model, max_new, eos, pad, temperature=cfg.sample_temperature, top_p=cfg.sample_top_p,
        batch_size=gen_batch, vocab_size=vocab,
    )

    def eval_sampler(prompts, seed):
        return sample(prompts, _EVAL_SEED_OFFSET + seed, 1.0, 1.0)

    def decode(tokens: Sequence[int]) -> str:
        return tokenizer.decode(list(tokens), skip_special_tokens=True)

    manifest = {
        "task": cfg.name,
        "teacher": {
            "name_or_path": cfg.teacher,
            "gguf_file": cfg.teacher_gguf_file,
            "dtype": cfg.teacher_dtype,
            "weights_sha256": weights_sha256(model),  # a path names no version: the weights are the identity
        },
        "tokenizer": {"name_or_path": tokenizer.name_or_path, "vocab_size": vocab},
        "sample_top_p": cfg.sample_top_p,
        "temperature": cfg.sample_temperature,
        "max_new_tokens": max_new,
        "template": cfg.template,
        "max_prompt_tokens": cfg.max_prompt_tokens,
        "data_seed": cfg.data_seed,
        "prompts_file": {"name": os.path.basename(cfg.prompts_file), "sha256": file_sha256(cfg.prompts_file)},
        # The split fractions, caps and fields all end up in the training prompts themselves.
        "train_prompts_sha1": _tokens_digest(train),
    }

    def draw_eval_samples() -> dict:
        base = int(cfg.data_seed) * 1_000_003
        n_refs = int(cfg.n_references)
        ref_samples = {}
        for split_name, prompts in (("val", val), ("test", test)):
            draws = [
                sample(prompts, base + _REFERENCE_SEED_OFFSET + i, 1.0, 1.0)
                for i in range(n_refs)
            ]
            ref_samples[split_name] = [[decode(d[j]) for d in draws] for j in range(len(prompts))]
        # Held-out KL responses come from the teacher's own (untruncated, temperature 1) distribution.
        heldout_responses = sample(val, base + _HELDOUT_SEED_OFFSET, 1.0, 1.0)
        test_heldout_responses = sample(test, base + _TEST_HELDOUT_SEED_OFFSET, 1.0, 1.0)
        return {"references": ref_samples, "heldout": heldout_responses, "test_heldout": test_heldout_responses}

    eval_key = {
        "manifest": manifest,
        # The references' sampling settings (fixed since they stopped following eval.top_p; the names are
        # kept so that caches drawn at eval.top_p = 1.0 stay valid).
        "eval_top_p": 1.0,
        "eval_temperature": 1.0,
        "n_references": cfg.n_references,
        "gen_batch_size": gen_batch,  # sampled tokens depend on the batch composition
        "val": _tokens_digest(val),
        "test": _tokens_digest(test),
        "test_heldout": True,  # caches drawn before the test prompts had held-out samples lack them
    }
    drawn = _cached(cfg.eval_cache_dir, cfg.name, eval_key, draw_eval_samples)

    def with_ground_truth(examples_: list[PromptExample], samples: list[list[str]]) -> list[list[str]]:
        return [([e.response] if e.response else []) + s for e, s in zip(examples_, samples)]

    val_refs = with_ground_truth(val_examples, drawn["references"]["val"])
    test_refs = with_ground_truth(test_examples, drawn["references"]["test"])
    if any(not r for r in val_refs + test_refs):
        raise ValueError(
            "Some evaluation prompts have no reference (no ground-truth response and n_references=0); "
            "set task.n_references >= 1."
        )
    info = {
        "teacher_parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": vocab,
        "prompts_in_file": len(examples),
        "prompts_dropped_too_long": dropped,
        "n_train_prompts": len(train),
        "n_val_prompts": len(val),
        "n_test_prompts": len(test),
        "test_prompts_with_ground_truth": sum(bool(e.response) for e in test_examples),
        "prompt_tokens_mean": sum(map(len, train)) / len(train),
    }
    def corpus():
        # The teacher's own text: its distribution (top-p 1.0, temperature 1) from the document separator.
        free_text = TeacherSampler(
            teacher.model, int(cfg.corpus_max_tokens), eos, pad, temperature=1.0, top_p=1.0, batch_size=gen_batch,
            vocab_size=vocab,
        )
        return hf_corpus(
            free_text, tokenizer, {k: manifest[k] for k in ("teacher", "tokenizer")}, cfg.name, cfg.corpus_file,
            cfg.corpus_text_field, int(cfg.corpus_sequences), int(cfg.corpus_max_tokens), int(cfg.data_seed),
        )

    return Task(
        name=cfg.name,
        teacher=teacher,
        vocab_size=vocab,
        eos_token_id=eos,
        pad_token_id=pad,
        train_prompts=train,
        val_prompts=val,
        test_prompts=test,
        val_references=val_refs,
        test_references=test_refs,
        max_new_tokens=max_new,
        data_sampler=data_sampler,
        eval_sampler=eval_sampler,
        decode=decode,
        manifest=manifest,
        heldout=(val, drawn["heldout"]),
        test_heldout=(test, drawn["test_heldout"]),
        tokenizer=tokenizer,
        info=info,
        corpus=corpus,
    )


def _cached(cache_dir: str | None, name: str, key: dict, compute) -> dict:
    """``compute()``, stored as JSON under ``cache_dir`` keyed by ``key`` (no caching when ``cache_dir`` is None)."""
    if cache_dir is None:
        return compute()
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:10]
    path = os.path.join(cache_dir, f"{name}-eval-{digest}.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    value = compute()
    os.makedirs(cache_dir, exist_ok=True)
    write_json_atomic(path, value)
    return value
