"""The pre-training corpus (tokenrl.tasks.corpus): free text of the task's language, built once under data_dir,
cached and verified like the teacher data, byte-reproducible; on transformers tasks from a file or the teacher's
own samples; and the trainer's pre-training batches (drawn with the run's generator, split like the batch)."""

from __future__ import annotations

import json
import os
import types

import numpy as np
import pytest
import torch

from tests.conftest import edit_manifest
from tests.test_datagen import assert_buffers_equal
from tests.test_hf_task import _task_cfg, tiny_files  # noqa: F401  (tiny_files is a fixture)
from tokenrl.data.samplers import BatchSampler
from tokenrl.run import distributed
from tokenrl.run.config import make_run_config
from tokenrl.run.inputs import build_task
from tokenrl.run.step import draw_batches
from tokenrl.tasks.corpus import load_corpus, read_documents
from tokenrl.tasks.datagen import FixedResponses, generate_teacher_data
from tokenrl.tasks.manifest import DataIntegrityError, file_sha256
from tokenrl.tasks.hf import build_hf_task

TASK = {"n_train_prompts": 16, "samples_per_prompt": 1, "n_val_prompts": 2, "n_test_prompts": 2, "max_new_tokens": 6,
        "corpus_sequences": 60, "corpus_max_tokens": 12}


def _task(**task):
    return build_task(make_run_config({"algo": {"name": "bc"}, "task": {**TASK, **task}}))


def _load(task, root, **kw):
    return load_corpus(task.teacher, task.corpus(), str(root), task.name, cache_top_p=0.8, pad_id=task.pad_token_id,
                       shard_prompts=16, **kw)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """``(task, root, buffer, folder)`` of a 60-row synthetic corpus in 4 shards."""
    task, root = _task(), tmp_path_factory.mktemp("corpus")
    buffer, folder, cached = _load(task, root)
    assert not cached
    return task, root, buffer, folder


def test_synthetic_corpus_is_free_text_of_the_language(synthetic, tmp_path):
    task, _, corpus, _ = synthetic
    assert len(corpus) == 60
    assert all(len(p) == 1 and p[0] != task.eos_token_id for p in corpus.prompts)  # a one-token context
    assert all(1 <= len(r) <= 12 for r in corpus.responses)
    assert 0 < sum(corpus.terminated) < 60 and all(r[-1] == task.eos_token_id for r, t in
                                                   zip(corpus.responses, corpus.terminated) if t)
    # Not answers to the training prompts: those are 4-8 tokens long.
    assert not {tuple(p) for p in corpus.prompts} & {tuple(p) for p in task.train_prompts}
    # Drawn from the teacher at the data's top-p (0.8) by default: every token lies in the top-0.8 set stored along
    # it; at corpus_top_p = 1.0 (the teacher's own distribution) some do not.
    batch = corpus.collate(list(range(60)))
    assert batch.action_in_set_BT[batch.action_mask_BT].all()
    full, _, _ = _load(_task(corpus_top_p=1.0), tmp_path)
    batch = full.collate(list(range(60)))
    assert not batch.action_in_set_BT[batch.action_mask_BT].all()
    # The first token of a row picks the topic (tokens 1..n_topics) but for the smoothing floor.
    assert np.mean([p[0] <= task.teacher.config.n_topics for p in corpus.prompts]) > 0.9


def test_corpus_is_cached_verified_and_reproducible(synthetic, tmp_path):
    task, root, corpus, folder = synthetic
    again, folder2, cached = _load(task, root)
    assert cached and folder2 == folder and os.path.basename(folder).startswith("synthetic-corpus-")
    assert_buffers_equal(again, corpus)
    # Built again elsewhere: the same files byte for byte.
    _, other, _ = _load(task, tmp_path)
    stored = json.loads(open(os.path.join(folder, "manifest.json")).read())["shards"]
    assert stored == json.loads(open(os.path.join(other, "manifest.json")).read())["shards"] and len(stored) == 4
    # Other settings, another folder (and another draw).
    _, folder3, cached3 = _load(_task(corpus_max_tokens=5), tmp_path)
    assert folder3 != other and not cached3


def test_tampered_corpus_is_refused_with_the_fix(synthetic, tmp_path):
    task, _, corpus, _ = synthetic
    _, folder, _ = _load(task, tmp_path)
    shard = os.path.join(folder, "shard-00002.safetensors")
    with open(shard, "r+b") as f:
        f.seek(os.path.getsize(shard) // 2)
        f.write(np.random.default_rng(0).integers(0, 256, 64, dtype=np.uint8).tobytes())
    with pytest.raises(DataIntegrityError, match="shard-00002.safetensors does not match its checksum"):
        _load(task, tmp_path)
    os.remove(shard)  # the offered fix: only that shard is regenerated, identical to the first build
    assert_buffers_equal(_load(task, tmp_path)[0], corpus)
    edit_manifest(folder, corpus={"source": "language", "sequences": 61})
    with pytest.raises(ValueError, match="different settings .*corpus: stored"):
        _load(task, tmp_path)


def test_fixed_responses_need_one_response_per_prompt(lang, tmp_path):
    fixed = FixedResponses([[5, 6], [7]], [False, False])
    with pytest.raises(ValueError, match="one response per prompt"):
        generate_teacher_data(lang, fixed, [[1], [2], [3]], str(tmp_path), samples_per_prompt=1, cache_top_p=0.8,
                              manifest={"task": "x"})
    buffer = generate_teacher_data(lang, fixed, [[1], [2]], str(tmp_path / "ok"), samples_per_prompt=1,
                                   cache_top_p=0.8, manifest={"task": "x"}, shard_prompts=1)
    assert [r.tolist() for r in buffer.responses] == [[5, 6], [7]] and len(buffer.caches[1].sizes) == 2


def test_hf_corpus_from_a_file_and_from_the_teacher(tiny_files, tmp_path):  # noqa: F811
    docs = ["the cat sat on the mat", "", "a dog ran under the rug then the cat ran", "the red rug"]
    jsonl, text = tmp_path / "corpus.jsonl", tmp_path / "corpus.txt"
    jsonl.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    text.write_text("\n".join(docs) + "\n")
    assert read_documents(str(text), "ignored") == [d for d in docs if d]
    for path in (jsonl, text):
        task = build_hf_task(_task_cfg(tiny_files, corpus_file=str(path), corpus_text_field="body",
                                       corpus_sequences=2, corpus_max_tokens=5))
        corpus, folder, _ = load_corpus(task.teacher, task.corpus(), str(tmp_path / "data"), task.name,
                                        cache_top_p=0.8, pad_id=task.pad_token_id, shard_prompts=1)
        tokenizer = task.tokenizer
        want = [tokenizer(d, add_special_tokens=False)["input_ids"][:5] for d in docs if d][:2]
        assert [r.tolist() for r in corpus.responses] == want
        separator = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        assert [p.tolist() for p in corpus.prompts] == [[separator]] * 2
        manifest = json.loads(open(os.path.join(folder, "manifest.json")).read())
        assert manifest["corpus"]["file"]["sha256"] == file_sha256(str(path))
    # Without a file: the teacher's own unconditional samples (from the separator).
    task = build_hf_task(_task_cfg(tiny_files, corpus_sequences=3, corpus_max_tokens=4))
    corpus, folder, _ = load_corpus(task.teacher, task.corpus(), str(tmp_path / "data"), task.name, cache_top_p=0.8,
                                    pad_id=task.pad_token_id, shard_prompts=2)
    assert len(corpus) == 3 and all(1 <= len(r) <= 4 for r in corpus.responses)
    assert json.loads(open(os.path.join(folder, "manifest.json")).read())["corpus"]["source"] == "teacher"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"body": "the cat"}) + "\n" + json.dumps({"text": "a dog"}) + "\n")
    with pytest.raises(ValueError, match=f"{bad}:2: no string field 'body'"):
        read_documents(str(bad), "body")


def _context(buffer, corpus, batch_size: int, seed: int = 0, world_size: int = 1, rank: int = 0):
    """The fields of a RunContext that :func:`draw_batches` reads."""
    return types.SimpleNamespace(
        buffer=buffer, corpus=corpus, generator=torch.Generator().manual_seed(seed),
        cfg=types.SimpleNamespace(batch_size=batch_size, device="cpu", algo_name="test"),
        dist=distributed.DistContext(rank=rank, world_size=world_size),
    )


def test_lm_batches_are_drawn_with_the_run_generator_and_split_like_the_batch(synthetic, synthetic_buffer):
    _, _, corpus, _ = synthetic
    algo = types.SimpleNamespace(top_p=0.5, sampler=BatchSampler(), needs_lm_batch=True)
    (whole,) = draw_batches(_context(synthetic_buffer, corpus, 8, seed=3), algo, micro=8)
    generator = torch.Generator().manual_seed(3)
    batch_rows = torch.randint(len(synthetic_buffer), (8,), generator=generator).tolist()
    rows = torch.randint(len(corpus), (8,), generator=generator).tolist()  # right after the distillation batch
    expected = corpus.collate(rows, top_p=0.5)
    assert torch.equal(whole.lm_batch.input_ids_BL, expected.input_ids_BL) and whole.lm_batch.top_p == 0.5
    assert torch.equal(whole.lm_batch.cand_mask_BSK, expected.cand_mask_BSK)
    assert torch.equal(whole.input_ids_BL, synthetic_buffer.collate(batch_rows, top_p=0.5).input_ids_BL)
    # Micro-batches (and ranks) get consecutive parts of the same draw.
    parts = [b.lm_batch for rank in (0, 1) for b in draw_batches(
        _context(synthetic_buffer, corpus, 8, seed=3, world_size=2, rank=rank), algo, micro=2)]
    assert [len(p.lengths_B) for p in parts] == [2] * 4
    assert torch.equal(torch.cat([p.lengths_B for p in parts]), expected.lengths_B)
    with pytest.raises(ValueError, match="no corpus"):
        draw_batches(_context(synthetic_buffer, None, 8), algo, micro=8)
