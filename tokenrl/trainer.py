"""The training run behind ``experiments/run.py``: data -> student -> algorithm updates -> evaluation -> artifacts.

Kept free of Hydra so it can be called from Python and tests: :func:`run` takes a plain nested dict (the
resolved config) and an output directory, and writes there

* ``tb/``: TensorBoard events (losses, Q statistics, top-p set sizes, evaluation metrics),
* ``metrics.json``: final/initial/teacher evaluation, training summary and the config (see ``experiments/report.py``),
* ``student.safetensors``: the student's weights (atomic write) and ``student/`` (``save_pretrained``),
* ``train_state.pt``: optimiser, schedule, RNG and step, written every ``checkpoint_every`` steps so that
  ``resume=true`` continues an interrupted run,
* ``config.yaml``: the resolved config.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_model
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from algorithms import make_algorithm, make_config
from tokenrl.buffer import write_json_atomic
from tokenrl.datagen import generate_teacher_data, load_teacher_data
from tokenrl.evaluation import evaluate, evaluate_teacher_samples
from tokenrl.policy import CausalLMPolicy
from tokenrl.tasks import SyntheticTaskConfig, Task, build_synthetic_task


@dataclass
class ModelConfig:
    """The student network."""

    kind: str = "fresh"  # fresh (new model from the fields below) | pretrained | pruned (layer-pruned teacher)
    arch: str = "llama"  # model_type of a fresh student
    hidden_size: int = 64  # fresh: width
    num_layers: int = 2  # fresh: decoder blocks
    num_heads: int = 4  # fresh: attention heads
    intermediate_size: int = 256  # fresh: MLP width
    name_or_path: str | None = None  # pretrained: hub id or local directory
    gguf_file: str | None = None  # pretrained: GGUF file inside name_or_path (or a direct path)
    keep_every: int = 2  # pruned: keep every k-th teacher block (and the last)
    dtype: str = "float32"  # parameter dtype


@dataclass
class EvalConfig:
    """Evaluation by sampling on held-out prompts (the MiniLLM/BD protocol, scaled down)."""

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])  # one sampling pass per seed
    temperature: float = 1.0  # sampling temperature
    top_p: float = 1.0  # sampling top-p of students and teacher (MiniLLM: 1.0, BD release: 0.8)
    batch_size: int = 128  # sequences per sampling batch
    n_prompts: int | None = None  # evaluate on the first n test prompts (None = all)
    val_every: int = 0  # validation (teacher-forced KL + one sampling seed) every n steps; 0 = off


@dataclass
class RunConfig:
    """Top-level run settings (``algo`` and ``task`` come from their config groups)."""

    algo: Any = None
    task: Any = None
    model: ModelConfig = field(default_factory=ModelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0  # training seed: student init, batch sampling, evaluation draws
    steps: int = 1000  # gradient updates of the algorithm
    sft_steps: int = 0  # SFT (BC) warm start on the offline data before the algorithm (the paper's recipe)
    sft_lr: float = 1e-3  # learning rate of the SFT warm start
    batch_size: int = 32  # trajectories per update
    device: str = "cpu"  # torch device
    threads: int = 1  # torch intra-op threads (0 = torch default); 1 avoids oversubscribing a shared small CPU
    log_every: int = 20  # TensorBoard scalar interval
    checkpoint_every: int = 0  # train_state.pt interval (0 = only at the end)
    resume: bool = False  # continue from train_state.pt in the output directory
    data_dir: str = "data_cache"  # where offline teacher data are cached (shared across runs)
    rollout_every: int = 0  # add student rollouts to the buffer every n steps (0 = only if the algorithm needs them: 10)
    rollout_prompts: int = 32  # prompts per rollout batch
    init_eval: bool = True  # evaluate the untrained student too
    teacher_eval: bool = True  # evaluate the teacher's own samples (the reference row)
    progress: bool = True  # tqdm progress bars


def build_task(task_cfg: dict, eval_cfg: dict) -> Task:
    """Dispatch on ``task.kind``/``task.name`` to the task builders."""
    kind = task_cfg.get("kind", "synthetic")
    if kind == "synthetic":
        known = {f.name for f in dataclasses.fields(SyntheticTaskConfig)}
        cfg = SyntheticTaskConfig(**{k: v for k, v in task_cfg.items() if k in known})
        return build_synthetic_task(cfg, eval_top_p=eval_cfg["top_p"], eval_temperature=eval_cfg["temperature"])
    if kind == "hf":
        from tokenrl.hf_task import build_hf_task

        return build_hf_task(task_cfg, eval_cfg)
    raise ValueError(f"unknown task kind {kind!r}; expected 'synthetic' or 'hf'")


def build_student(model_cfg: dict, task: Task, seed: int, device: str) -> torch.nn.Module:
    """Create the student network for ``task`` (fresh, pretrained or layer-pruned)."""
    torch.manual_seed(seed)
    kind = model_cfg["kind"]
    if task.tokenizer is None:
        if kind != "fresh":
            raise ValueError(f"model.kind={kind!r} needs a transformers task; the synthetic task only takes 'fresh'")
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.for_model(
            model_cfg["arch"],
            vocab_size=task.vocab_size,
            hidden_size=model_cfg["hidden_size"],
            intermediate_size=model_cfg["intermediate_size"],
            num_hidden_layers=model_cfg["num_layers"],
            num_attention_heads=model_cfg["num_heads"],
            num_key_value_heads=model_cfg["num_heads"],
            max_position_embeddings=256,
            eos_token_id=task.eos_token_id,
            pad_token_id=task.pad_token_id,
            bos_token_id=None,
            tie_word_embeddings=False,
        )
        model = AutoModelForCausalLM.from_config(config)
        return model.to(device=device, dtype=getattr(torch, model_cfg["dtype"]))
    from tokenrl.hf_task import build_hf_student

    return build_hf_student(model_cfg, task, seed, device)


def load_or_generate_data(cfg: dict, task: Task, progress: bool):
    """The task's offline teacher data: loaded when complete on disk, else generated (or resumed).

    Returns ``(buffer, data_dir, seconds, was_cached)``.
    """
    data_dir = os.path.join(cfg["data_dir"], task.data_key())
    task_cfg = cfg["task"]
    cache_p = float(task_cfg.get("cache_top_p", 0.8))
    manifest_file = os.path.join(data_dir, "manifest.json")
    start = time.time()
    complete = False
    if os.path.exists(manifest_file):
        with open(manifest_file) as f:
            n_shards = json.load(f).get("n_shards", -1)
        complete = all(os.path.exists(os.path.join(data_dir, f"shard-{i:05d}.safetensors")) for i in range(n_shards))
    if complete:
        buffer = load_teacher_data(data_dir)
    else:
        buffer = generate_teacher_data(
            task.teacher,
            task.data_sampler,
            task.train_prompts,
            data_dir,
            samples_per_prompt=int(task_cfg.get("samples_per_prompt", 1)),
            cache_top_p=cache_p,
            manifest=task.manifest,
            shard_prompts=int(task_cfg.get("shard_prompts", 256)),
            seed=int(task_cfg.get("data_seed", 0)),
            pad_id=task.pad_token_id,
            cache_batch_size=int(task_cfg.get("cache_batch_size", 32)),
            progress=progress,
        )
    return buffer, data_dir, time.time() - start, complete


def _eval_student(model, task: Task, cfg: dict, seeds, prompts=None, refs=None, heldout="default") -> dict:
    ev = cfg["eval"]
    prompts = task.test_prompts if prompts is None else prompts
    refs = task.test_references if refs is None else refs
    n = ev.get("n_prompts")
    if n:
        prompts, refs = prompts[:n], refs[:n]
    return evaluate(
        model,
        task.teacher,
        prompts,
        refs,
        task.decode,
        eos_token_id=task.eos_token_id,
        pad_token_id=task.pad_token_id,
        max_new_tokens=task.max_new_tokens,
        seeds=list(seeds),
        temperature=ev["temperature"],
        top_p=ev["top_p"],
        heldout=task.heldout if heldout == "default" else heldout,
        batch_size=ev["batch_size"],
        vocab_size=task.vocab_size,
    )


def student_logits_fn(model: torch.nn.Module, pad_token_id: int, vocab_size: int):
    """``(tokens_BT, lengths_B) -> logits_BV`` of the next token for right-padded prefixes (for env rollouts)."""

    @torch.no_grad()
    def fn(tokens_BT: torch.Tensor, lengths_B: torch.Tensor) -> torch.Tensor:
        from tokenrl.models import left_pad

        tokens, attn, pos = left_pad(tokens_BT, lengths_B, pad_token_id)
        out = model(input_ids=tokens, attention_mask=attn, position_ids=pos, use_cache=False)
        return out.logits[:, -1, :vocab_size].float()

    return fn


def collect_rollouts(model, task: Task, buffer, n_prompts: int, top_p: float | None, seed: int) -> dict[str, float]:
    """Sample student rollouts on training prompts through the batched env and add them to ``buffer``.

    With ``top_p < 1`` the student samples inside the teacher's top-p set (the top-p MDP's action set), so
    every learner action has a cached Q. Rollouts are added with ``is_expert=False`` and their top-p cache.
    """
    from envs import BatchedTokenGenerationEnv
    from envs.top_p_wrapper import top_p_restricted_policy
    from tokenrl.datagen import compute_top_p_cache

    rng = np.random.default_rng(seed)
    idx = rng.choice(len(task.train_prompts), size=min(n_prompts, len(task.train_prompts)), replace=False)
    prompts = [task.train_prompts[i] for i in idx]
    env = BatchedTokenGenerationEnv(
        task.vocab_size, task.eos_token_id, task.max_new_tokens, max(len(p) for p in prompts),
        pad_token_id=task.pad_token_id,
    )
    was_training = model.training
    model.eval()
    teacher = task.teacher
    if task.tokenizer is not None:
        # Transformers models: one KV-cached step per env step for both the student and the teacher.
        from tokenrl.models import HFTeacher, IncrementalTeacher

        policy_fn = IncrementalTeacher(HFTeacher(model, task.tokenizer)).next_token_logits
        if isinstance(teacher, HFTeacher):
            teacher = IncrementalTeacher(teacher)
    else:
        policy_fn = student_logits_fn(model, task.pad_token_id, task.vocab_size)
    if top_p is not None and top_p < 1.0:
        policy_fn = top_p_restricted_policy(policy_fn, teacher, top_p)
    traj = env.rollout(policy_fn, prompts=prompts, seed=seed)
    model.train(was_training)
    caches = compute_top_p_cache(task.teacher, traj.prompts, traj.responses, buffer.cache_top_p, pad_id=task.pad_token_id)
    buffer.add(traj.prompts, traj.responses, traj.terminated, traj.truncated, caches=caches, rewards=traj.rewards, is_expert=False)
    return {"rollout/mean_len": float(np.mean([len(r) for r in traj.responses])), "rollout/buffer_size": float(len(buffer))}


def apply_threads(cfg: dict) -> None:
    """Set torch's intra-op threads from ``cfg["threads"]`` (0 keeps torch's default)."""
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))


def _log_scalars(writer: SummaryWriter, metrics: dict, step: int) -> None:
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and np.isfinite(v):
            writer.add_scalar(k, v, step)


def _atomic_torch_save(obj: Any, path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def run(cfg: dict, out_dir: str) -> dict:
    """Train and evaluate one student; returns the metrics written to ``metrics.json``."""
    os.makedirs(out_dir, exist_ok=True)
    apply_threads(cfg)
    progress = bool(cfg.get("progress", True))
    device = cfg.get("device", "cpu")
    seed = int(cfg["seed"])
    algo_cfg = dict(cfg["algo"])
    algo_name = algo_cfg.pop("name")
    timings: dict[str, float] = {}

    make_config(algo_name, algo_cfg)  # validate the algorithm's options before any expensive work
    t0 = time.time()
    task = build_task(cfg["task"], cfg["eval"])
    timings["task_build_s"] = time.time() - t0
    buffer, data_dir, timings["data_s"], data_cached = load_or_generate_data(cfg, task, progress)
    set_sizes = buffer.set_sizes()
    data_stats = {
        "data/trajectories": len(buffer),
        "data/tokens": buffer.n_tokens,
        "data/bytes_per_token": buffer.bytes_per_token(),
        "data/set_size_mean": float(set_sizes.mean()) if len(set_sizes) else 0.0,
        "data/set_size_p50": float(np.percentile(set_sizes, 50)) if len(set_sizes) else 0.0,
        "data/set_size_p99": float(np.percentile(set_sizes, 99)) if len(set_sizes) else 0.0,
        "data/set_size_max": int(set_sizes.max()) if len(set_sizes) else 0,
        "data/terminated_frac": float(np.mean(buffer.terminated)),
        "data/cached": bool(data_cached),
    }

    model = build_student(cfg["model"], task, seed, device)
    policy = CausalLMPolicy(model, vocab_size=task.vocab_size)
    generator = torch.Generator().manual_seed(seed)
    writer = SummaryWriter(os.path.join(out_dir, "tb"))
    state_path = os.path.join(out_dir, "train_state.pt")
    results: dict[str, Any] = {"algo": algo_name, "seed": seed, "config": cfg, "data": data_stats}

    start_step = 0
    if cfg.get("resume") and os.path.exists(state_path):
        state = torch.load(state_path, weights_only=False)
        algo = make_algorithm(algo_name, policy, algo_cfg, total_steps=int(cfg["steps"]))
        algo.load_state_dict(state["algo"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        start_step = int(state["step"])
        results.update(state.get("results", {}))
    else:
        ev_seeds = cfg["eval"]["seeds"]
        if cfg.get("teacher_eval", True):
            t0 = time.time()
            n = cfg["eval"].get("n_prompts")
            tp, tr = (task.test_prompts[:n], task.test_references[:n]) if n else (task.test_prompts, task.test_references)
            results["teacher_eval"] = evaluate_teacher_samples(
                task.teacher, tp, tr, task.decode, task.eval_sampler, seeds=ev_seeds, batch_size=cfg["eval"]["batch_size"]
            )
            timings["teacher_eval_s"] = time.time() - t0
        if cfg.get("init_eval", True):
            t0 = time.time()
            results["init_eval"] = _eval_student(model, task, cfg, ev_seeds)
            timings["init_eval_s"] = time.time() - t0
            _log_scalars(writer, results["init_eval"], 0)

        sft_steps = int(cfg.get("sft_steps") or 0)
        if sft_steps > 0:
            t0 = time.time()
            sft = make_algorithm("bc", policy, {"lr": float(cfg.get("sft_lr", 1e-3))}, total_steps=sft_steps)
            for _ in tqdm(range(sft_steps), desc="sft warm start", disable=not progress):
                sft_stats = sft.update(buffer.sample(int(cfg["batch_size"]), generator).to(device))
            _log_scalars(writer, {f"sft/{k}": v for k, v in sft_stats.items()}, 0)
            timings["sft_s"] = time.time() - t0
            results["sft_eval"] = _eval_student(model, task, cfg, ev_seeds)
        # Built after the warm start so that anything copied from the policy (target networks) starts there.
        algo = make_algorithm(algo_name, policy, algo_cfg, total_steps=int(cfg["steps"]))

    def save_state(step: int) -> None:
        _atomic_torch_save(
            {
                "algo": algo.state_dict(),
                "generator": generator.get_state(),
                "torch_rng": torch.get_rng_state(),
                "step": step,
                "results": {k: results[k] for k in ("teacher_eval", "init_eval", "sft_eval") if k in results},
            },
            state_path,
        )

    t0 = time.time()
    stats: dict[str, float] = {}
    steps = int(cfg["steps"])
    val_every = int(cfg["eval"].get("val_every") or 0)
    bar = tqdm(range(start_step, steps), desc=f"{algo_name} train", disable=not progress, initial=start_step, total=steps)
    rollout_every = int(cfg.get("rollout_every") or 0)
    wants_rollouts = algo.needs_rollouts or getattr(algo.config, "reward", None) == "sqil"
    if wants_rollouts and rollout_every == 0:
        rollout_every = 10
    for step in bar:
        if rollout_every and step % rollout_every == 0:
            ro = collect_rollouts(model, task, buffer, int(cfg.get("rollout_prompts", 32)), algo.top_p, seed * 1_000_003 + step)
            _log_scalars(writer, ro, step)
        batch = buffer.sample(int(cfg["batch_size"]), generator, top_p=algo.top_p).to(device)
        stats = algo.update(batch)
        if (step + 1) % int(cfg["log_every"]) == 0 or step + 1 == steps:
            _log_scalars(writer, stats, step + 1)
            bar.set_postfix(loss=f"{stats['loss/total']:.4f}")
        if val_every and (step + 1) % val_every == 0 and step + 1 < steps:
            val = _eval_student(model, task, cfg, [0], task.val_prompts, task.val_references)
            _log_scalars(writer, {k.replace("eval/", "val/"): v for k, v in val.items()}, step + 1)
        if cfg.get("checkpoint_every") and (step + 1) % int(cfg["checkpoint_every"]) == 0:
            save_state(step + 1)
    timings["train_s"] = time.time() - t0
    save_state(steps)

    t0 = time.time()
    results["final_eval"] = _eval_student(model, task, cfg, cfg["eval"]["seeds"])
    timings["final_eval_s"] = time.time() - t0
    _log_scalars(writer, results["final_eval"], steps)
    writer.close()

    tmp = os.path.join(out_dir, f"student.safetensors.tmp-{os.getpid()}")
    save_model(model, tmp)  # drops the duplicate of tied embeddings (SmolLM2, Qwen2.5-0.5B) instead of failing
    os.replace(tmp, os.path.join(out_dir, "student.safetensors"))
    if task.tokenizer is not None:
        from tokenrl.models import save_student

        save_student(model, task.tokenizer, os.path.join(out_dir, "student"))
    else:
        model.save_pretrained(os.path.join(out_dir, "student"))
    results["train"] = {"steps": steps, "last_stats": stats, "data_dir": data_dir, **timings}
    results["task_info"] = task.info
    write_json_atomic(os.path.join(out_dir, "metrics.json"), results)
    return results
