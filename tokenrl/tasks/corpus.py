"""A task's pre-training corpus: free text for the language-modelling terms that the papers compute on it.

MiniLLM adds a language-modelling loss on a pre-training corpus (OpenWebText in its release) and the released
Bellman Distill trainer computes its LM term on an OpenWebText batch; ``algorithms`` ask for such a batch with
``needs_lm_batch`` and the trainer draws it from the corpus built here. The corpus is built once, stored under
``data_dir`` and verified on every load exactly like the offline teacher data (:mod:`tokenrl.tasks.datagen`:
``manifest.json`` with every setting, SHA-256 per shard, resumable, byte-reproducible), in its own folder
``<task>-corpus-<hash>``.

Each corpus row is stored as a trajectory: a one-token context (the buffer's "prompt") followed by the text
(the "response", whose tokens the LM terms score), with the teacher's top-p sets along it at the task's
``cache_top_p`` (for a KD term on the corpus). Sources:

* synthetic tasks (:func:`synthetic_corpus`): unconditional text of the language itself, i.e. sequences drawn
  from its start state by the teacher at temperature 1 and top-p ``corpus_top_p``, ``corpus_max_tokens`` tokens
  after the first or up to EOS. The first token is drawn without EOS (an event of probability ``smoothing / V``
  at the start state, which would leave no text). These are free text, not answers to the training prompts.
  ``corpus_top_p`` defaults to the data's ``sample_top_p`` (0.8): the text the SFT student was trained on, the
  role a pre-training corpus plays for a pretrained student. At 1.0 (the teacher's own distribution) about one
  token in 50 is drawn from the synthetic teacher's uniform smoothing floor, and CE on that text pulls the
  student's mass onto it: MiniLLM's PT term on such a corpus made its samples worse (teacher NLL and on-policy
  KL, ``experiments/onpolicy_start.py``) while the same run on the top-p-0.8 corpus improved them;
* transformers tasks (:func:`hf_corpus`): the documents of ``task.corpus_file`` (JSONL with the text in
  ``task.corpus_text_field``, or plain text with one document per non-empty line), each cut to
  ``corpus_max_tokens`` tokens after the document separator; without a file, the teacher's own unconditional
  samples (from the separator, top-p 1.0, temperature 1), a small default that needs nothing but the teacher.
  The separator is the tokenizer's BOS, or its EOS where it has no BOS (GPT-2's ``<|endoftext|>``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tokenrl.core.top_p import check_p
from tokenrl.data.buffer import ReplayBuffer
from tokenrl.tasks.datagen import FixedResponses, Sampler, load_or_generate_data
from tokenrl.tasks.manifest import data_manifest, dataset_dir, file_sha256
from tokenrl.tasks.synthetic import SyntheticLanguage

CORPUS_SEED_OFFSET = 900_000
"""Added to ``data_seed`` for the corpus's draws, so they never share a random stream with the teacher data."""


@dataclass
class CorpusSource:
    """What :func:`load_corpus` stores: one context per row, what continues it, and the settings behind both.

    Attributes:
        contexts: one non-empty token list per row (the stored trajectories' prompts).
        sampler: draws the rows' text (:data:`~tokenrl.tasks.datagen.Sampler`), or holds it
            (:class:`~tokenrl.tasks.datagen.FixedResponses`).
        manifest: every setting that changes the corpus (teacher identity, source, counts, seeds).
        seed: base seed of the sampler's shards (see :func:`tokenrl.tasks.datagen.generate_teacher_data`).
    """

    contexts: list[list[int]]
    sampler: Sampler | FixedResponses
    manifest: dict
    seed: int


def _check_counts(sequences: int, max_tokens: int) -> None:
    if sequences <= 0:
        raise ValueError(f"task.corpus_sequences={sequences}: must be > 0; set task.corpus_sequences=<a row count>")
    if max_tokens <= 0:
        raise ValueError(f"task.corpus_max_tokens={max_tokens}: must be > 0; set task.corpus_max_tokens=<a length>")


def synthetic_corpus(
    lang: SyntheticLanguage,
    teacher_manifest: dict,
    name: str,
    sequences: int,
    max_tokens: int,
    data_seed: int,
    top_p: float = 1.0,
) -> CorpusSource:
    """Unconditional text of a synthetic language (see the module docstring).

    Args:
        lang: the language (the task's teacher).
        teacher_manifest: the task manifest's entries that identify the teacher (``teacher``, ``tokenizer``).
        name: the task's name.
        sequences: rows of the corpus.
        max_tokens: tokens per row after its first (fewer when EOS comes first).
        data_seed: the task's data seed (offset by :data:`CORPUS_SEED_OFFSET`).
        top_p: the teacher draws the text from its top-p projection (1.0: its own distribution).
    """
    _check_counts(sequences, max_tokens)
    check_p(top_p)
    seed = data_seed + CORPUS_SEED_OFFSET
    contexts = lang.sample_prompts(sequences, np.random.default_rng(seed), length=1)

    def sampler(prompts: Sequence[Sequence[int]], shard_seed: int) -> list[tuple[list[int], bool]]:
        return lang.sample_continuations(
            [list(p) for p in prompts], max_tokens, np.random.default_rng(shard_seed), top_p=top_p
        )

    manifest = {
        "task": name,
        **teacher_manifest,
        "corpus": {"source": "language", "sequences": sequences, "max_tokens": max_tokens, "top_p": top_p, "temperature": 1.0},
    }
    return CorpusSource(contexts, sampler, manifest, seed)


def read_documents(path: str, text_field: str) -> list[str]:
    """The documents of a corpus file: JSONL (``.jsonl``/``.json``, the text in ``text_field``) or plain text (one
    document per non-empty line).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a JSONL line that is not an object with a string ``text_field`` (``file:line`` named).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"task.corpus_file {path!r} does not exist (cwd {os.getcwd()}); set it or null")
    with open(path, encoding="utf-8") as f:
        lines = [(i, line.strip()) for i, line in enumerate(f, 1) if line.strip()]
    if not path.endswith((".jsonl", ".json")):
        return [line for _, line in lines]
    documents = []
    for number, line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not JSON ({error})") from None
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise ValueError(
                f"{path}:{number}: no string field {text_field!r}; set task.corpus_text_field to the text's field"
            )
        documents.append(text)
    return documents


def hf_corpus(
    teacher_sampler: Sampler,
    tokenizer,
    teacher_manifest: dict,
    name: str,
    corpus_file: str | None,
    text_field: str,
    sequences: int,
    max_tokens: int,
    data_seed: int,
) -> CorpusSource:
    """The corpus of a transformers task: a file's documents, or the teacher's unconditional samples.

    Args:
        teacher_sampler: samples the teacher at top-p 1.0 and temperature 1 for ``max_tokens`` tokens (used when
            ``corpus_file`` is None).
        tokenizer: the teacher's tokenizer.
        teacher_manifest: the task manifest's entries that identify the teacher and tokenizer.
        name: the task's name.
        corpus_file: JSONL or text file (see :func:`read_documents`), or None for the teacher's samples.
        text_field: JSONL field holding the text.
        sequences: rows of the corpus (the first ``sequences`` non-empty documents of a file).
        max_tokens: tokens per row after the separator.
        data_seed: the task's data seed (offset by :data:`CORPUS_SEED_OFFSET`).

    Raises:
        ValueError: bad counts, or a file without a non-empty document.
    """
    _check_counts(sequences, max_tokens)
    separator = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    seed = data_seed + CORPUS_SEED_OFFSET
    corpus = {"sequences": sequences, "max_tokens": max_tokens, "separator": int(separator)}
    if corpus_file is None:
        sampler: Sampler | FixedResponses = teacher_sampler
        contexts = [[int(separator)] for _ in range(sequences)]
        corpus.update({"source": "teacher", "top_p": 1.0, "temperature": 1.0})
    else:
        texts = read_documents(corpus_file, text_field)
        responses = [ids[:max_tokens] for ids in (tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts)]
        responses = [r for r in responses if r][:sequences]
        if not responses:
            raise ValueError(f"task.corpus_file {corpus_file!r} holds no non-empty document")
        sampler = FixedResponses(responses, [False] * len(responses))
        contexts = [[int(separator)] for _ in responses]
        corpus.update({
            "source": "file",
            "file": {"name": os.path.basename(corpus_file), "sha256": file_sha256(corpus_file)},
            "text_field": text_field,
            "tokens_sha1": hashlib.sha1(json.dumps(responses).encode()).hexdigest()[:16],
        })
    return CorpusSource(contexts, sampler, {"task": name, **teacher_manifest, "corpus": corpus}, seed)


def load_corpus(
    teacher,
    source: CorpusSource,
    root: str,
    name: str,
    *,
    cache_top_p: float,
    pad_id: int,
    shard_prompts: int,
    cache_batch_size: int = 32,
    progress: bool = False,
    shard_rank: int = 0,
    shard_world: int = 1,
) -> tuple[ReplayBuffer, str, bool]:
    """The corpus under ``root``: verified and loaded when stored, built (or resumed) otherwise.

    Args:
        teacher: the task's teacher (its top-p sets along the text are stored with it).
        source: the corpus's contexts, text and settings.
        root: the data directory (``data_dir``).
        name: the task's name (the folder is ``<name>-corpus-<hash of the full manifest>``).
        cache_top_p: p of the stored sets (the task's ``cache_top_p``).
        pad_id, shard_prompts, cache_batch_size, progress, shard_rank, shard_world: as in
            :func:`tokenrl.tasks.datagen.generate_teacher_data`.

    Returns:
        ``(buffer, folder, was_complete)``.

    Raises:
        ValueError / DataIntegrityError: as :func:`tokenrl.tasks.datagen.load_or_generate_data` (a stored
        corpus with other settings, or a damaged shard or manifest, is named with the fix).
    """
    settings = {"samples_per_prompt": 1, "cache_top_p": cache_top_p, "shard_prompts": shard_prompts, "seed": source.seed}
    folder = dataset_dir(root, f"{name}-corpus", data_manifest(source.manifest, source.contexts, **settings))
    buffer, complete = load_or_generate_data(
        teacher, source.sampler, source.contexts, folder, manifest=source.manifest, pad_id=pad_id,
        cache_batch_size=cache_batch_size, progress=progress, shard_rank=shard_rank, shard_world=shard_world,
        **settings,
    )
    return buffer, folder, complete
