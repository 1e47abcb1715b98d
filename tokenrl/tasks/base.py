"""Tasks: a teacher, prompt splits, references, a teacher sampler and a decoder, built from a config.

The default task is the exact synthetic language (:mod:`tokenrl.tasks.synthetic`); real-LM tasks built on
transformers teachers live in :mod:`tokenrl.tasks.hf`. A training run only talks to the :class:`Task` fields.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch

from tokenrl.core.options import NON_NEGATIVE, POSITIVE, PROBABILITY, field_problems
from tokenrl.tasks.corpus import CorpusSource, synthetic_corpus
from tokenrl.tasks.datagen import Sampler
from tokenrl.tasks.synthetic import SyntheticLanguage, SyntheticLanguageConfig
from tokenrl.core.teachers import Teacher


@dataclass
class Task:
    """Everything a run needs from the task side.

    Attributes:
        name: task name (used in data directory names).
        teacher: the teacher (implements :class:`~tokenrl.core.teachers.Teacher`).
        vocab_size: shared vocabulary size.
        eos_token_id: EOS id (ends responses).
        pad_token_id: id used for padding.
        train_prompts / val_prompts / test_prompts: prompt token lists.
        test_references: per test prompt, reference texts for Rouge-L.
        val_references: per validation prompt, reference texts for Rouge-L.
        max_new_tokens: response budget (truncation).
        data_sampler: draws the offline data from the teacher (its sampling settings are in ``manifest``).
        eval_sampler: draws teacher responses at the teacher's own settings (top-p 1.0, temperature 1): the
            teacher row of the evaluation.
        decode: tokens -> text for Rouge-L.
        manifest: settings that identify the offline data.
        heldout: (prompts, responses): a teacher sample per validation prompt, for the teacher-forced metrics of
            validation (the selection score).
        test_heldout: (prompts, responses): a teacher sample per test prompt, for the teacher-forced metrics of
            the evaluation (apart from ``heldout``, so that selection never sees what the evaluation reports).
        tokenizer: the teacher's tokenizer (transformers tasks), None for the synthetic language.
        student_config: model config fields a fresh student takes from the task (vocabulary, special ids)
            when there is no tokenizer to supply them (see :func:`tokenrl.lm.models.make_student`).
        info: extra facts reported in metrics.json.
        corpus: builds the task's pre-training corpus source (:mod:`tokenrl.tasks.corpus`); called only by runs
            whose algorithm asks for pre-training batches (``needs_lm_batch``). None: the task has none.
    """

    name: str
    teacher: Teacher
    vocab_size: int
    eos_token_id: int
    pad_token_id: int
    train_prompts: list[list[int]]
    val_prompts: list[list[int]]
    test_prompts: list[list[int]]
    val_references: list[list[str]]
    test_references: list[list[str]]
    max_new_tokens: int
    data_sampler: Sampler
    eval_sampler: Sampler
    decode: Callable[[list[int]], str]
    manifest: dict
    heldout: tuple[list[list[int]], list[list[int]]]
    test_heldout: tuple[list[list[int]], list[list[int]]]
    tokenizer: object | None = None
    student_config: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    corpus: Callable[[], CorpusSource] | None = None


@dataclass
class SyntheticTaskConfig:
    """The exact synthetic-language task (the embedded default); the schema of ``task=synthetic``."""

    name: str = "synthetic"
    kind: str = "synthetic"  # selects this schema and builder
    language: SyntheticLanguageConfig = field(default_factory=SyntheticLanguageConfig)
    n_train_prompts: int = 2000  # prompts of the offline data
    samples_per_prompt: int = 4  # teacher samples per training prompt (the paper uses 8)
    # Validation prompts (one held-out teacher sample each: the selection score). Over redrawn validation sets of
    # 2000, the teacher-forced KL(s||t) of one student spreads by 0.010 (std) and the difference between two by
    # 0.003, against 0.031 and 0.012 with 100 prompts (experiments/validation_noise.py; methods differ by ~0.05).
    n_val_prompts: int = 2000
    n_test_prompts: int = 200  # held-out test prompts
    n_references: int = 4  # teacher samples per test prompt used as Rouge-L references
    max_new_tokens: int = 32  # response budget; longer responses are truncated (bootstrapped)
    sample_top_p: float = 0.8  # top-p of the teacher when sampling the offline data (= training p)
    cache_top_p: float = 0.8  # p of the stored teacher top-p sets (>= every p trained on)
    data_seed: int = 1234  # seed of prompts and teacher data (fixed across training seeds)
    shard_prompts: int = 256  # prompts per data shard
    cache_batch_size: int = 64  # sequences per teacher forward in the cache pass
    corpus_sequences: int = 2000  # rows of the pre-training corpus: free text of the language (tokenrl.tasks.corpus)
    corpus_max_tokens: int = 40  # tokens per corpus row after its first (fewer when EOS comes first)
    # top-p of the teacher drawing the corpus; None = sample_top_p (the text the SFT student was trained on); 1.0 =
    # the language's own distribution, uniform smoothing floor included (see tokenrl.tasks.corpus)
    corpus_top_p: float | None = None

    def problems(self, prefix: str = "task") -> list[str]:
        """Every field out of its range, the language's included, one line each."""
        ranges = {
            "n_train_prompts": POSITIVE, "samples_per_prompt": POSITIVE, "n_val_prompts": POSITIVE,
            "n_test_prompts": POSITIVE, "n_references": NON_NEGATIVE, "max_new_tokens": POSITIVE,
            "sample_top_p": PROBABILITY, "cache_top_p": PROBABILITY, "data_seed": NON_NEGATIVE, "shard_prompts": POSITIVE,
            "cache_batch_size": POSITIVE, "corpus_sequences": POSITIVE, "corpus_max_tokens": POSITIVE,
            "corpus_top_p": PROBABILITY.explained("null = sample_top_p"),
        }
        language = self.language
        if not isinstance(language, SyntheticLanguageConfig):
            language = SyntheticLanguageConfig(**language)
        return field_problems(self, prefix, ranges) + language.problems(f"{prefix}.language")


def build_synthetic_task(cfg: SyntheticTaskConfig) -> Task:
    """Build the synthetic task: prompts and references are drawn from the language itself.

    References, held-out responses (of the validation and of the test prompts) and the teacher's evaluation
    samples are teacher samples at the teacher's own settings (top-p 1.0, temperature 1), drawn from streams
    seeded by ``data_seed`` alone, so they do not change with the students' decoding settings
    (``eval.decode_top_p``, ``eval.temperature``). The validation split has a stream of its own, so that its size
    changes neither the training prompts (the offline data) nor the test prompts.
    """
    lang_cfg = cfg.language if isinstance(cfg.language, SyntheticLanguageConfig) else SyntheticLanguageConfig(**cfg.language)
    lang = SyntheticLanguage(lang_cfg)
    rng = np.random.default_rng(cfg.data_seed)
    prompts = lang.sample_prompts(cfg.n_train_prompts + cfg.n_test_prompts, rng)
    train, test = prompts[: cfg.n_train_prompts], prompts[cfg.n_train_prompts :]
    val_rng = np.random.default_rng([cfg.data_seed, 1])
    val = lang.sample_prompts(cfg.n_val_prompts, val_rng)

    def refs(ps: list[list[int]], stream: np.random.Generator) -> list[list[str]]:
        rep = [p for p in ps for _ in range(cfg.n_references)]
        samples = lang.sample_continuations(rep, cfg.max_new_tokens, stream, top_p=1.0, temperature=1.0)
        texts = [lang.token_to_text(r) for r, _ in samples]
        return [texts[i * cfg.n_references : (i + 1) * cfg.n_references] for i in range(len(ps))]

    def held_out(ps: list[list[int]], stream: np.random.Generator) -> tuple[list[list[int]], list[list[int]]]:
        return ps, [r for r, _ in lang.sample_continuations(ps, cfg.max_new_tokens, stream, top_p=1.0)]

    test_refs, test_heldout = refs(test, rng), held_out(test, rng)
    val_refs, heldout = refs(val, val_rng), held_out(val, val_rng)

    def data_sampler(ps, seed):
        return lang.sample_continuations(ps, cfg.max_new_tokens, np.random.default_rng(seed), top_p=cfg.sample_top_p)

    def eval_sampler(ps, seed):
        samples = lang.sample_continuations(ps, cfg.max_new_tokens, np.random.default_rng(10_000 + seed), top_p=1.0)
        return [r for r, _ in samples]

    manifest = {
        "task": "synthetic",
        "teacher": {"kind": "SyntheticLanguage", **_language_manifest(lang_cfg)},
        "tokenizer": f"synthetic-{lang_cfg.vocab_size}",
        "sample_top_p": cfg.sample_top_p,
        "temperature": 1.0,
        "max_new_tokens": cfg.max_new_tokens,
        "data_seed": cfg.data_seed,
    }
    return Task(
        name=cfg.name,
        teacher=lang,
        vocab_size=lang.vocab_size,
        eos_token_id=lang.eos_token_id,
        pad_token_id=lang.eos_token_id,
        train_prompts=train,
        val_prompts=val,
        test_prompts=test,
        val_references=val_refs,
        test_references=test_refs,
        max_new_tokens=cfg.max_new_tokens,
        data_sampler=data_sampler,
        eval_sampler=eval_sampler,
        decode=lang.token_to_text,
        manifest=manifest,
        heldout=heldout,
        test_heldout=test_heldout,
        # The synthetic language has no tokenizer; a fresh student has no BOS, short contexts and its own head.
        student_config={
            "vocab_size": lang.vocab_size,
            "bos_token_id": None,
            "eos_token_id": lang.eos_token_id,
            "pad_token_id": lang.eos_token_id,
            "max_position_embeddings": 256,
            "tie_word_embeddings": False,
        },
        info={"teacher_top_p_states_mean_size": _mean_state_set_size(lang, cfg.cache_top_p)},
        corpus=lambda: synthetic_corpus(
            lang, {k: manifest[k] for k in ("teacher", "tokenizer")}, cfg.name, cfg.corpus_sequences,
            cfg.corpus_max_tokens, cfg.data_seed, cfg.sample_top_p if cfg.corpus_top_p is None else cfg.corpus_top_p,
        ),
    )


# Language options added after data caches existed: listed in the manifest only when set, so that the caches
# of languages drawn before them (which these defaults reproduce bit for bit) keep their keys.
_LATER_LANGUAGE_OPTIONS = {"support_log_std": 0.0, "concentration_log_std": 0.0, "transitions": "fsm"}


def _language_manifest(lang_cfg: SyntheticLanguageConfig) -> dict:
    return {
        k: v for k, v in asdict(lang_cfg).items()
        if k not in _LATER_LANGUAGE_OPTIONS or v != _LATER_LANGUAGE_OPTIONS[k]
    }


def _mean_state_set_size(lang: SyntheticLanguage, p: float) -> float:
    from tokenrl.core.top_p import top_p_mask

    return float(top_p_mask(torch.from_numpy(lang.log_emission_SV), p).sum(-1).double().mean())
