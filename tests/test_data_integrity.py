"""Issue 9, data: a cached dataset is used only if its manifest matches every setting and every shard its checksum."""

from __future__ import annotations

import hashlib
import json
import os
import warnings

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from tests.conftest import edit_manifest
from tests.test_datagen import MANIFEST, assert_buffers_equal, generate
from tokenrl.data.buffer import ReplayBuffer
from tokenrl.run.config import make_run_config
from tokenrl.tasks.datagen import load_or_generate_data, load_teacher_data
from tokenrl.tasks.manifest import DataIntegrityError, data_manifest, dataset_dir, file_sha256
from tokenrl.run.inputs import build_task, load_data


@pytest.fixture(scope="module")
def prompts(lang):
    return lang.sample_prompts(10, np.random.default_rng(11))


def _snapshot(directory) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))}


def test_every_data_setting_is_in_the_manifest_and_the_folder_name(prompts):
    base = dict(samples_per_prompt=2, cache_top_p=0.9, shard_prompts=4, seed=3)
    reference = data_manifest(MANIFEST, prompts, **base)
    changes = [
        ("samples_per_prompt", dict(base, samples_per_prompt=1), prompts),
        ("cache_top_p", dict(base, cache_top_p=0.95), prompts),
        ("shard_prompts", dict(base, shard_prompts=5), prompts),
        ("seed", dict(base, seed=4), prompts),
        ("n_prompts", base, prompts[:9]),
        ("prompts_sha256", base, [list(p)[::-1] for p in prompts]),
    ]
    for key, settings, ps in changes:
        changed = data_manifest(MANIFEST, ps, **settings)
        assert changed[key] != reference[key], key
        assert dataset_dir("root", "t", changed) != dataset_dir("root", "t", reference), key
    assert reference["format"] >= 2


def test_a_run_with_other_counts_gets_other_data(tmp_path):
    """run.py then run.py task.n_train_prompts=... samples_per_prompt=1 used to train on the first run's data."""
    def cfg(n, k):
        return make_run_config({
            "algo": {"name": "bc"}, "progress": False, "data_dir": str(tmp_path),
            "task": {"n_train_prompts": n, "samples_per_prompt": k, "n_val_prompts": 1, "n_test_prompts": 1,
                     "max_new_tokens": 4, "shard_prompts": 4},
        })

    first = cfg(8, 2)
    buffer, first_dir, cached = load_data(first, build_task(first))
    assert (len(buffer), cached) == (16, False)
    second = cfg(4, 1)
    buffer, second_dir, cached = load_data(second, build_task(second))
    assert (len(buffer), cached) == (4, False) and second_dir != first_dir
    buffer, again_dir, cached = load_data(first, build_task(first))
    assert (len(buffer), cached, again_dir) == (16, True, first_dir)


def test_complete_dataset_is_still_compared_on_load(lang, prompts, tmp_path):
    """When every shard exists the manifest used not to be compared at all."""
    out = tmp_path / "data"
    generate(lang, out, prompts)
    before = _snapshot(out)
    with pytest.raises(ValueError, match="samples_per_prompt: stored 2 vs requested 1") as err:
        load_or_generate_data(lang, None, prompts, str(out), manifest=MANIFEST, samples_per_prompt=1, cache_top_p=0.9,
                              shard_prompts=4, seed=3, progress=False)
    assert "delete" in str(err.value)
    assert _snapshot(out) == before


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _random_bytes(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 256] = np.random.default_rng(0).integers(0, 256, 256, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))


def _edit_logprobs(path):
    """A well-formed shard whose teacher log-probs were changed (it still parses)."""
    with safe_open(str(path), framework="numpy") as f:
        metadata = f.metadata()
    arrays = load_file(str(path))
    arrays["cache_logprobs"] = (arrays["cache_logprobs"] + np.float16(0.5)).astype(np.float16)
    save_file(arrays, str(path), metadata=metadata)


@pytest.mark.parametrize("damage", [_truncate, _random_bytes, _edit_logprobs])
def test_damaged_shard_is_named_and_regenerating_it_restores_the_checksum(lang, prompts, tmp_path, damage):
    out = tmp_path / "data"
    reference = generate(lang, out, prompts)
    shard = out / "shard-00001.safetensors"
    recorded = json.loads((out / "manifest.json").read_text())["shards"][shard.name]
    assert recorded == file_sha256(str(shard))
    damage(shard)
    before = _snapshot(out)
    for load in (lambda: load_teacher_data(str(out)), lambda: generate(lang, out, prompts)):
        with pytest.raises(DataIntegrityError) as err:
            load()
        message = str(err.value)
        assert str(shard) in message and "checksum" in message
        assert f"delete {shard}" in message and "generate.py" in message
        assert _snapshot(out) == before  # nothing rewritten
    # The offered fix: delete the shard and rerun; only it is regenerated, byte-identical to the original.
    os.remove(shard)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a differing regenerated shard would warn
        assert_buffers_equal(generate(lang, out, prompts), reference)
    assert file_sha256(str(shard)) == recorded
    assert_buffers_equal(load_teacher_data(str(out)), reference)


def test_manifest_edited_to_fewer_shards_is_refused(lang, prompts, tmp_path):
    """A manifest edited to n_shards=2 used to train on part of the data."""
    out = tmp_path / "data"
    generate(lang, out, prompts)
    edit_manifest(out, n_shards=2)
    with pytest.raises(ValueError, match="n_shards: stored 2 vs requested 3"):
        generate(lang, out, prompts)
    with pytest.raises(DataIntegrityError, match="n_shards=2 but has checksums of 3 shards") as err:
        load_teacher_data(str(out))
    assert str(out / "manifest.json") in str(err.value)


def test_truncated_manifest_is_named(lang, prompts, tmp_path):
    out = tmp_path / "data"
    generate(lang, out, prompts)
    _truncate(out / "manifest.json")
    before = _snapshot(out)
    for load in (lambda: load_teacher_data(str(out)), lambda: generate(lang, out, prompts)):
        with pytest.raises(DataIntegrityError, match="manifest") as err:
            load()
        assert str(out / "manifest.json") in str(err.value) and f"delete the folder {out}" in str(err.value)
    assert _snapshot(out) == before


def test_shard_written_but_not_recorded_is_regenerated(lang, prompts, tmp_path):
    """A run killed between writing a shard and recording its checksum leaves an unverifiable shard."""
    out = tmp_path / "data"
    reference = generate(lang, out, prompts)
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["shards"]["shard-00002.safetensors"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "shard-00002.safetensors").write_bytes(b"half a shard")
    with pytest.raises(FileNotFoundError, match="never completed"):
        load_teacher_data(str(out))
    assert_buffers_equal(generate(lang, out, prompts), reference)
    assert_buffers_equal(load_teacher_data(str(out)), reference)


def test_orphaned_tmp_files_of_dead_processes_are_removed(lang, prompts, tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    dead = out / "shard-00000.safetensors.tmp-999999999"
    ours = out / f"notes.tmp-{os.getpid()}"  # a live process (this one) is still writing it
    dead.write_bytes(b"x")
    ours.write_bytes(b"x")
    generate(lang, out, prompts)
    assert not dead.exists() and ours.exists()


def test_shard_files_are_byte_reproducible(synthetic_buffer, tmp_path):
    """safetensors wrote a multi-key metadata map in hash order: identical buffers gave different bytes."""
    digests = set()
    for i in range(6):
        path = str(tmp_path / f"b{i}.safetensors")
        synthetic_buffer.save(path)
        digests.add(hashlib.sha256(open(path, "rb").read()).hexdigest())
    assert len(digests) == 1
    assert_buffers_equal(ReplayBuffer.load(path), synthetic_buffer)



def test_a_complete_data_set_is_read_without_writing_anything(lang, prompts, tmp_path):
    """Under torchrun rank 0 rewrote manifest.json even when every shard was on disk and recorded, so a read-only
    shared data cache failed. Each rank of a sharded load (without a process group ``barrier`` waits for nobody,
    so the two ranks' calls run one after the other) and a single-process load leave every file untouched."""
    out = tmp_path / "data"
    reference = generate(lang, out, prompts)
    before = {path: (data, os.stat(out / path).st_mtime_ns) for path, data in _snapshot(out).items()}
    settings = dict(manifest=MANIFEST, samples_per_prompt=2, cache_top_p=0.9, shard_prompts=4, seed=3, progress=False)
    for rank, world in ((0, 2), (1, 2), (0, 1)):
        buffer, complete = load_or_generate_data(
            lang, None, prompts, str(out), shard_rank=rank, shard_world=world, **settings
        )
        assert complete
        assert_buffers_equal(buffer, reference)
    assert {path: (data, os.stat(out / path).st_mtime_ns) for path, data in _snapshot(out).items()} == before
