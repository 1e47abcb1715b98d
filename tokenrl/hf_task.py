"""Real-LM tasks: a transformers teacher, instruction prompts, references and samplers, built from a config.

``task.kind == "hf"`` configs (schema :class:`tokenrl.config.HFTaskNode`, e.g. ``task=smollm2``,
``task=dolly_gpt2``) come here through :func:`tokenrl.trainer.build_task`; the student of such a task is
built by :func:`build_hf_student`. The pieces are the ones of :func:`tokenrl.tasks.build_synthetic_task`:

* prompts: a Dolly-style JSONL file, rendered with the MiniLLM/BD template or the tokenizer's chat template,
  split deterministically (:func:`tokenrl.prompts.split_examples`) before tokenisation so the split does not
  depend on the teacher; prompts longer than ``max_prompt_tokens`` are then dropped and counted;
* references (Rouge-L): the ground-truth response where the file has one, plus ``n_references`` teacher
  samples drawn with the evaluation's top-p/temperature;
* samplers: batched KV-cache sampling of the teacher (:func:`tokenrl.evaluation.sample_responses`).

Teacher samples needed at build time (references, the held-out KL responses) cost as much as a short data
generation on a real teacher, so they are cached as JSON under ``eval_cache_dir`` when it is set.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence

import torch

from tokenrl.buffer import write_json_atomic
from tokenrl.evaluation import sample_responses
from tokenrl.models import HFTeacher, check_same_vocabulary, load_causal_lm, make_student
from tokenrl.prompts import PromptExample, format_prompt, load_jsonl_prompts, split_examples
from tokenrl.tasks import Task

TEMPLATES = ("minillm", "chat")
"""``minillm``: the MiniLLM/BD instruction template; ``chat``: ``tokenizer.apply_chat_template``."""

# Seed offsets (added to data_seed * 1_000_003, the base of the offline data's shard seeds) keep the
# reference and held-out draws apart from the offline data and from the evaluation draws (10_000 + seed).
_REFERENCE_SEED_OFFSET = 500_000
_HELDOUT_SEED_OFFSET = 600_000
_EVAL_SEED_OFFSET = 10_000


def _task_settings(task_cfg: dict) -> dict:
    """``task_cfg`` completed with the :class:`~tokenrl.config.HFTaskNode` defaults, checked."""
    from tokenrl.config import HFTaskNode

    defaults = {f.name: f.default for f in dataclasses.fields(HFTaskNode)}
    unknown = sorted(set(task_cfg) - set(defaults))
    if unknown:
        raise ValueError(f"Unknown hf task settings {unknown}; known: {sorted(defaults)}.")
    cfg = {**defaults, **task_cfg}
    for required in ("teacher", "prompts_file"):
        if cfg[required] in (None, "???"):
            raise ValueError(f"The hf task needs task.{required} (see tokenrl.config.HFTaskNode).")
    if cfg["template"] not in TEMPLATES:
        raise ValueError(f"task.template must be one of {TEMPLATES}, got {cfg['template']!r}.")
    return cfg


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


def _tokens_digest(prompts: Sequence[Sequence[int]]) -> str:
    return hashlib.sha1(json.dumps([list(p) for p in prompts]).encode()).hexdigest()[:16]


def build_hf_task(task_cfg: dict, eval_cfg: dict) -> Task:
    """Build a transformers-teacher task from a ``task=<hf task>`` config.

    Args:
        task_cfg: the resolved task node (fields of :class:`tokenrl.config.HFTaskNode`; missing ones take
            its defaults).
        eval_cfg: the resolved ``eval`` node; its ``top_p`` and ``temperature`` are used for the teacher's
            reference answers and the teacher's evaluation samples.

    Returns:
        The :class:`~tokenrl.tasks.Task`. ``task.teacher`` is an :class:`~tokenrl.models.HFTeacher` (its
        ``.model`` is what a ``pruned`` student copies) and ``task.tokenizer`` the teacher's tokenizer.

    Raises:
        ValueError: unknown or missing settings, or no prompt left in a split after the length filter.
        FileNotFoundError: the teacher or the prompts file cannot be found.
    """
    cfg = _task_settings(task_cfg)
    model, tokenizer = load_causal_lm(cfg["teacher"], gguf_file=cfg["teacher_gguf_file"], dtype=cfg["teacher_dtype"])
    teacher = HFTeacher(model, tokenizer, max_batch=int(cfg["cache_batch_size"]))
    eos, pad, vocab = teacher.eos_token_id, teacher.pad_token_id, teacher.vocab_size
    max_new = int(cfg["max_new_tokens"])
    gen_batch = int(cfg["gen_batch_size"])

    if not os.path.isfile(cfg["prompts_file"]):
        raise FileNotFoundError(f"task.prompts_file {cfg['prompts_file']!r} does not exist (cwd {os.getcwd()}).")
    examples = load_jsonl_prompts(
        cfg["prompts_file"], cfg["instruction_field"], cfg["context_field"], cfg["response_field"]
    )
    splits = split_examples(examples, cfg["val_fraction"], cfg["test_fraction"], cfg["data_seed"])
    caps = (cfg["max_train_prompts"], cfg["max_val_prompts"], cfg["max_test_prompts"])
    kept, dropped = [], {}
    for split_name, split, cap in zip(("train", "val", "test"), splits, caps):
        kept_examples, kept_prompts, dropped[split_name] = _keep_short(
            split, _tokenize_prompts(split, tokenizer, cfg["template"]), int(cfg["max_prompt_tokens"]), cap
        )
        if not kept_prompts:
            raise ValueError(
                f"No {split_name} prompt left in {cfg['prompts_file']} (split {len(split)}, "
                f"{dropped[split_name]} longer than max_prompt_tokens={cfg['max_prompt_tokens']}); "
                f"raise the split fraction or max_prompt_tokens."
            )
        kept.append((kept_examples, kept_prompts))
    (_, train), (val_examples, val), (test_examples, test) = kept

    def sample(prompts: Sequence[Sequence[int]], seed: int, top_p: float, temperature: float) -> list[list[int]]:
        return sample_responses(
            teacher.model, [list(p) for p in prompts], max_new, eos, pad, seed,
            temperature=temperature, top_p=top_p, batch_size=gen_batch, vocab_size=vocab,
        )

    def data_sampler(prompts, seed):
        responses = sample(prompts, seed, cfg["sample_top_p"], cfg["sample_temperature"])
        return [(r, bool(r) and r[-1] == eos) for r in responses]

    def eval_sampler(prompts, seed):
        return sample(prompts, _EVAL_SEED_OFFSET + seed, eval_cfg["top_p"], eval_cfg["temperature"])

    def decode(tokens: Sequence[int]) -> str:
        return tokenizer.decode(list(tokens), skip_special_tokens=True)

    manifest = {
        "task": cfg["name"],
        "teacher": {"name_or_path": cfg["teacher"], "gguf_file": cfg["teacher_gguf_file"], "dtype": cfg["teacher_dtype"]},
        "tokenizer": {"name_or_path": tokenizer.name_or_path, "vocab_size": vocab},
        "sample_top_p": cfg["sample_top_p"],
        "temperature": cfg["sample_temperature"],
        "max_new_tokens": max_new,
        "template": cfg["template"],
        "max_prompt_tokens": cfg["max_prompt_tokens"],
        "data_seed": cfg["data_seed"],
        "prompts_file": {"name": os.path.basename(cfg["prompts_file"]), "bytes": os.path.getsize(cfg["prompts_file"])},
        # The split fractions, caps and fields all end up in the training prompts themselves.
        "train_prompts_sha1": _tokens_digest(train),
    }

    def draw_eval_samples() -> dict:
        base = int(cfg["data_seed"]) * 1_000_003
        n_refs = int(cfg["n_references"])
        ref_samples = {}
        for split_name, prompts in (("val", val), ("test", test)):
            draws = [
                sample(prompts, base + _REFERENCE_SEED_OFFSET + i, eval_cfg["top_p"], eval_cfg["temperature"])
                for i in range(n_refs)
            ]
            ref_samples[split_name] = [[decode(d[j]) for d in draws] for j in range(len(prompts))]
        # Held-out KL responses come from the teacher's own (untruncated, temperature 1) distribution.
        heldout_responses = sample(val, base + _HELDOUT_SEED_OFFSET, 1.0, 1.0)
        return {"references": ref_samples, "heldout": heldout_responses}

    eval_key = {
        "manifest": manifest,
        "eval_top_p": eval_cfg["top_p"],
        "eval_temperature": eval_cfg["temperature"],
        "n_references": cfg["n_references"],
        "gen_batch_size": gen_batch,  # sampled tokens depend on the batch composition
        "val": _tokens_digest(val),
        "test": _tokens_digest(test),
    }
    drawn = _cached(cfg["eval_cache_dir"], cfg["name"], eval_key, draw_eval_samples)

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
    return Task(
        name=cfg["name"],
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
        tokenizer=tokenizer,
        info=info,
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


def build_hf_student(model_cfg: dict, task: Task, seed: int, device: str) -> torch.nn.Module:
    """The student of a transformers task, sharing the teacher's vocabulary.

    Args:
        model_cfg: the resolved ``model`` node (:class:`tokenrl.trainer.ModelConfig`): ``pretrained`` loads
            ``name_or_path``/``gguf_file``; ``pruned`` copies the teacher keeping every ``keep_every``-th
            block; ``fresh`` is a new ``arch`` model of the given sizes over the teacher's tokenizer.
        task: a task from :func:`build_hf_task`.
        seed: initialisation seed of a fresh student.
        device: torch device.

    Raises:
        ValueError: unknown kind, missing ``name_or_path``, or a vocabulary that differs from the teacher's.
    """
    if not isinstance(task.teacher, HFTeacher):
        raise ValueError(f"build_hf_student needs a task from build_hf_task; got teacher {type(task.teacher).__name__}.")
    overrides = {
        "model_type": model_cfg["arch"],
        "hidden_size": model_cfg["hidden_size"],
        "intermediate_size": model_cfg["intermediate_size"],
        "num_hidden_layers": model_cfg["num_layers"],
        "num_attention_heads": model_cfg["num_heads"],
        "num_key_value_heads": model_cfg["num_heads"],
    }
    student, tokenizer = make_student(
        model_cfg["kind"],
        teacher_model=task.teacher.model,
        teacher_tokenizer=task.tokenizer,
        name_or_path=model_cfg.get("name_or_path"),
        config_overrides=overrides,
        keep_every=int(model_cfg.get("keep_every", 2)),
        gguf_file=model_cfg.get("gguf_file"),
        dtype=model_cfg.get("dtype", "float32"),
        device=device,
        seed=seed,
    )
    check_same_vocabulary(task.tokenizer, tokenizer)
    return student.to(device)
