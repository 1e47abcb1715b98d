"""Tests of the transformers tasks (tokenrl.tasks.hf), their configs and experiments/generate.py, on a tiny
random Llama teacher with a word-level tokenizer saved to a temporary directory (no hub access)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys

import pytest

from tests.test_models import tiny_llama, word_tokenizer
from tokenrl.run.config import ModelConfig
from tokenrl.tasks.hf import HFTaskConfig, build_hf_task, weights_sha256
from tokenrl.run.rollouts import StageClock, collect_rollouts
from tokenrl.run.inputs import build_student

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONF = os.path.join(ROOT, "experiments", "conf")

# Responses are sentences of the tokenizer's words, so decoded teacher samples and ground truths overlap.
SENTENCES = [
    ("the cat sat on the mat", "", "the cat sat"),
    ("the dog ran", "under the big red rug", "the dog ran quickly"),
    ("a small cat", "", ""),
    ("the blue dog sat then ran", "", "then ran"),
    ("a big dog and a small cat", "on the mat", "and a cat"),
    ("the red cat ran slowly", "", "slowly"),
    ("a dog sat under the rug", "", ""),
    ("the cat and the dog", "then the cat ran", "the dog"),
    ("a red rug", "", "a rug"),
    ("the small blue cat", "", "blue cat"),
    ("the dog sat quickly", "", "quickly"),
    ("a cat ran on the rug", "", "a cat ran"),
]
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}then {% endif %}"


def _write_teacher(directory: str) -> None:
    tokenizer = word_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    teacher = tiny_llama(len(tokenizer), layers=4)
    # Tied input/output embeddings, as in SmolLM2 and Qwen2.5-0.5B: the run must still save its student.
    teacher.config.tie_word_embeddings = True
    teacher.tie_weights()
    assert teacher.lm_head.weight.data_ptr() == teacher.model.embed_tokens.weight.data_ptr()
    teacher.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def _write_prompts(path: str) -> None:
    with open(path, "w") as f:
        for text, context, response in SENTENCES:
            f.write(json.dumps({"question": text, "context": context, "answer": response}) + "\n")
        # Longer than max_prompt_tokens below: dropped and counted.
        f.write(json.dumps({"question": " ".join(["the cat"] * 40), "context": "", "answer": "a"}) + "\n")


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_task")
    _write_teacher(str(root / "teacher"))
    _write_prompts(str(root / "prompts.jsonl"))
    return root


def _task_cfg(files, **overrides) -> HFTaskConfig:
    cfg = {
        "name": "tiny",
        "teacher": str(files / "teacher"),
        "prompts_file": str(files / "prompts.jsonl"),
        "instruction_field": "question",
        "response_field": "answer",
        "template": "chat",
        "max_prompt_tokens": 40,
        "max_new_tokens": 6,
        "val_fraction": 0.2,
        "test_fraction": 0.25,
        "n_references": 2,
        "gen_batch_size": 4,
    }
    cfg.update(overrides)
    return HFTaskConfig(**cfg)


@pytest.mark.parametrize("template", ["chat", "minillm"])
def test_build_hf_task(tiny_files, template, tmp_path):
    cfg = _task_cfg(tiny_files, template=template, eval_cache_dir=str(tmp_path / "eval"))
    task = build_hf_task(cfg)

    assert sum(task.info["prompts_dropped_too_long"].values()) == 1
    splits = [set(map(tuple, s)) for s in (task.train_prompts, task.val_prompts, task.test_prompts)]
    assert all(splits) and not (splits[0] & splits[1] or splits[0] & splits[2] or splits[1] & splits[2])
    assert all(len(p) <= 40 for s in splits for p in s)
    if template == "chat":
        # The template text carries the turn format; no special token is added in front of it.
        assert all(p[-1] == task.tokenizer.convert_tokens_to_ids("then") for p in task.test_prompts)
    ground_truths = {response for _, _, response in SENTENCES if response}
    for refs in task.test_references:
        # Ground truth (when the example has one) first, then the n_references=2 teacher samples.
        assert len(refs) in (2, 3) and all(isinstance(r, str) for r in refs)
        assert len(refs) == 2 or refs[0] in ground_truths
    assert sum(len(r) == 3 for r in task.test_references) == task.info["test_prompts_with_ground_truth"]
    assert len(task.val_references) == len(task.val_prompts)
    assert task.heldout[0] == task.val_prompts and len(task.heldout[1]) == len(task.val_prompts)
    # The evaluation's teacher-forced metrics read their own held-out samples, of the test prompts.
    assert task.test_heldout[0] == task.test_prompts and len(task.test_heldout[1]) == len(task.test_prompts)

    manifest = task.manifest
    assert manifest["teacher"]["name_or_path"] == cfg.teacher and manifest["teacher"]["gguf_file"] is None
    assert manifest["tokenizer"]["vocab_size"] == len(task.tokenizer) == task.vocab_size
    with open(cfg.prompts_file, "rb") as f:
        assert manifest["prompts_file"] == {"name": "prompts.jsonl", "sha256": hashlib.sha256(f.read()).hexdigest()}
    # The teacher's identity is its weights: a path says nothing about which weights it held when the data were made.
    assert manifest["teacher"]["weights_sha256"] == weights_sha256(task.teacher.model)
    assert weights_sha256(tiny_llama(len(task.tokenizer), layers=4, seed=1)) != manifest["teacher"]["weights_sha256"]
    for key in ("sample_top_p", "temperature", "max_new_tokens", "template", "data_seed", "train_prompts_sha1"):
        assert key in manifest
    json.dumps(task.info)  # reported in metrics.json

    samples = task.data_sampler(task.train_prompts[:3], 7)
    assert samples == task.data_sampler(task.train_prompts[:3], 7)
    for response, terminated in samples:
        assert 1 <= len(response) <= 6 and terminated == (response[-1] == task.eos_token_id)
    assert len(task.eval_sampler(task.test_prompts, 0)) == len(task.test_prompts)
    assert task.decode([4, task.eos_token_id]) == "the"  # special tokens are skipped

    # The build-time teacher samples are cached: a second build reads them back unchanged.
    assert os.listdir(tmp_path / "eval")
    again = build_hf_task(cfg)
    assert again.test_references == task.test_references and again.heldout == task.heldout
    assert again.test_heldout == task.test_heldout
    assert again.manifest == task.manifest
    assert build_hf_task(dataclasses.replace(cfg, data_seed=1)).manifest != task.manifest


@pytest.mark.parametrize("kind", ["pruned", "fresh"])
def test_build_hf_student(tiny_files, kind):
    task = build_hf_task(_task_cfg(tiny_files, n_references=1))
    model_cfg = ModelConfig(kind=kind, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, keep_every=2)
    student = build_student(model_cfg, task, seed=0, device="cpu")
    assert student.get_output_embeddings().weight.shape[0] >= task.vocab_size
    assert student.config.num_hidden_layers == (3 if kind == "pruned" else 1)  # blocks 0, 2 and the last


def test_unknown_setting_and_missing_prompts(tiny_files):
    with pytest.raises(TypeError, match="max_promt_tokens"):
        _task_cfg(tiny_files, max_promt_tokens=3)
    with pytest.raises(ValueError, match="task.teacher"):
        build_hf_task(HFTaskConfig(prompts_file=str(tiny_files / "prompts.jsonl")))
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        build_hf_task(_task_cfg(tiny_files, prompts_file=str(tiny_files / "nope.jsonl")))


def _yaml_names(group: str) -> list[str]:
    return sorted(f[:-5] for f in os.listdir(os.path.join(CONF, group)) if f.endswith(".yaml"))


@pytest.mark.parametrize("group,name", [("task", n) for n in _yaml_names("task")] + [("model", n) for n in _yaml_names("model")])
def test_configs_compose(group, name):
    from omegaconf import OmegaConf

    from tokenrl.run.config import compose_config

    cfg = compose_config(CONF, [f"{group}={name}"])
    node = OmegaConf.to_container(cfg[group], resolve=True, throw_on_missing=False)
    assert node["kind"] in ({"synthetic", "hf"} if group == "task" else {"fresh", "pretrained", "pruned"})
    if group == "task" and node["kind"] == "hf":
        assert node["eval_cache_dir"] == cfg.data_dir


def _hf_overrides(files, tmp_path) -> list[str]:
    return [
        "task=smollm2",
        f"task.teacher={files / 'teacher'}",
        "task.teacher_gguf_file=null",
        f"task.prompts_file={files / 'prompts.jsonl'}",
        "task.instruction_field=question",
        "task.response_field=answer",
        "task.max_new_tokens=6",
        "task.max_prompt_tokens=40",
        "task.val_fraction=0.2",
        "task.test_fraction=0.25",
        "task.shard_prompts=4",
        f"data_dir={tmp_path / 'data'}",
        "eval.seeds=[0]",
        "progress=false",
        "threads=1",
    ]


def _run(script: str, args: list[str]) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "experiments", script), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_generate_twice_then_train(tiny_files, tmp_path):
    """generate.py writes the data, reruns load it, and run.py (both algorithms) trains on that same data."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    overrides = [*_hf_overrides(tiny_files, tmp_path), "task.samples_per_prompt=2"]
    first, second = (_run("generate.py", [*overrides, f"hydra.run.dir={tmp_path / 'gen'}"]) for _ in range(2))
    assert "generated" in first and "loaded from cache" in second
    data_dirs = [out.split("data dir: ")[1].split(" (")[0] for out in (first, second)]
    assert data_dirs[0] == data_dirs[1] and os.path.isdir(data_dirs[0])
    trajectories = [int(out.split("trajectories: ")[1].split(" ")[0]) for out in (first, second)]
    with open(os.path.join(data_dirs[0], "manifest.json")) as f:
        assert trajectories[0] == trajectories[1] == 2 * json.load(f)["n_prompts"]

    sweep = tmp_path / "sweep"
    _run(
        "run.py",
        ["-m", *overrides, "model=pruned", "algo=bc,iql_bd", "steps=3", "batch_size=4",
         f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${algo.name}"],
    )
    for algo in ("bc", "iql_bd"):
        with open(sweep / algo / "metrics.json") as f:
            metrics = json.load(f)
        assert metrics["algo"] == algo and metrics["train"]["steps"] == 3
        assert metrics["data"]["data/cached"] and metrics["train"]["data_dir"] == data_dirs[0]
        assert "eval/rougeL" in metrics["final_eval"] and metrics["task_info"]["n_train_prompts"] > 0
        student = AutoModelForCausalLM.from_pretrained(sweep / algo / "student")
        tokenizer = AutoTokenizer.from_pretrained(sweep / algo / "student")
        assert student.config.num_hidden_layers == 3 and len(tokenizer) == metrics["task_info"]["vocab_size"]


def test_online_rollouts_on_a_transformers_task(tiny_files, tmp_path):
    """The trainer's online path on a real LM: KV-cached student and teacher, actions inside the teacher's set."""
    from algorithms import make_algorithm
    from tokenrl.data.buffer import ReplayBuffer
    from tokenrl.lm.policy import CausalLMPolicy
    task = build_hf_task(_task_cfg(tiny_files, eval_cache_dir=str(tmp_path / "eval")))
    student = build_student(ModelConfig(kind="pruned"), task, seed=0, device="cpu")
    buffer = ReplayBuffer(pad_id=task.pad_token_id, cache_top_p=0.8)
    algo = make_algorithm("soft_q", CausalLMPolicy(student, vocab_size=task.vocab_size), {"reward": "sqil", "top_p": 0.8})
    stats = collect_rollouts(student, task, buffer, algo, n_prompts=3, seed=0, clock=StageClock())
    assert len(buffer) == 3 and not any(buffer.is_expert) and stats["rollout/buffer_size"] == 3
    batch = buffer.collate([0, 1, 2], top_p=0.8)
    # Sampled inside the teacher's top-p set (up to float16 rounding of the cache at the set boundary).
    assert batch.action_in_set_BT[batch.action_mask_BT].float().mean() >= 0.9
    assert student.training  # collect_rollouts restores train mode
