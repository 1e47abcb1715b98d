"""How precise is validation? The spread of every validation quantity of one student over redrawn validation sets.

Selection (``selection=best``) ranks checkpoints by a validation score, and the benchmark compares methods whose
differences are ~0.05 KL(s||t) on the default task (RESULTS.md); a score whose own sampling spread is near that
size picks checkpoints by noise. This script holds the student fixed and draws a fresh validation set
``--replicates`` times per setting (``N`` prompts of the task's language and what is sampled on them):

* teacher-forced metrics (``selection.metric``, by default ``kl_student_teacher``): ``k`` held-out teacher
  samples per prompt (a task has one per validation prompt: ``N = task.n_val_prompts``, ``k = 1``);
* sampled metrics (the ``val/*`` of ``eval.val_every``, and ``selection.metric=teacher_nll|rougeL``): the
  student's samples with ``S`` sampling seeds per prompt (``eval.val_seeds``, on ``eval.val_n_prompts``
  prompts), at every ``eval.decode_top_p``, and the on-policy KL (one pass per seed).

Each row: the mean over replicates, their sample std (the spread of one validation of that size), min-max, and
the seconds one validation takes (scoring and sampling, not drawing the held-out teacher samples, which a task
does once). With ``--versus`` a second student is scored on the same draws and the rows ``(difference)`` give
the spread of the paired difference, which is what ranking two checkpoints or methods depends on.

The student: ``--student`` (a run's ``student.safetensors``, or an SFT start ``sft_starts/<digest>.safetensors`` of
``selection.sft_cache``), else ``--sft-steps`` BC updates at the run's ``sft_lr`` (deterministic for a seed).

    python experiments/validation_noise.py --quick                    # a 1000-step SFT student, a small grid
    python experiments/validation_noise.py --student A.safetensors --versus outputs/<run>/student.safetensors \
        --heldout 100:1,100:16,500:1,2000:1 --sampled 100:1,500:1,500:4
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from safetensors.torch import load_file

from algorithms import make_algorithm
from tokenrl.evaluation.metrics import evaluate_decodings, teacher_forced_kl
from tokenrl.evaluation.onpolicy import on_policy_reverse_kl_of_model
from tokenrl.lm.policy import CausalLMPolicy
from tokenrl.run.checkpoint import is_state_file
from tokenrl.run.config import RunConfig, compose_run_config
from tokenrl.run.context import apply_threads
from tokenrl.run.inputs import build_student, build_task, load_data
from tokenrl.run.selection import read_sft_start
from tokenrl.tasks.base import Task
from tokenrl.tasks.synthetic import SyntheticLanguage

CONF_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conf")
SEED_BASE = 50_000  # replicate r's sampling seeds start at SEED_BASE + 1000 r: apart from any run's seeds


def fixed_student(cfg: RunConfig, task: Task, path: str | None, sft_steps: int) -> torch.nn.Module:
    """The student every row scores: the weights at ``path``, or ``sft_steps`` BC updates from the run's init."""
    model = build_student(cfg.model, task, cfg.seed, cfg.device)
    if path is not None:
        state = read_sft_start(path)["model"] if is_state_file(path) else load_file(path)
        loaded = model.load_state_dict(state, strict=False)  # a run's safetensors drops tied duplicates
        if loaded.unexpected_keys or (loaded.missing_keys and not model.config.tie_word_embeddings):
            raise SystemExit(
                f"{path} is not a student of this config (missing {loaded.missing_keys[:3]}, unexpected "
                f"{loaded.unexpected_keys[:3]}): pass the run's overrides (task=..., model=...)"
            )
        return model
    buffer, _, _ = load_data(cfg, task)
    policy = CausalLMPolicy(model, vocab_size=task.vocab_size)
    sft = make_algorithm("bc", policy, {"lr": cfg.sft_lr}, total_steps=sft_steps)
    generator = torch.Generator().manual_seed(cfg.seed)
    for _ in range(sft_steps):
        sft.update(sft.sampler.batch(buffer, cfg.batch_size, generator, sft.top_p))
    return model


def draw_prompts(lang: SyntheticLanguage, n: int, seed: list[int]) -> list[list[int]]:
    """``n`` fresh prompts of the task's language (a validation set of that size, drawn with ``seed``)."""
    return lang.sample_prompts(n, np.random.default_rng(seed))


def draw_references(lang: SyntheticLanguage, prompts: list[list[int]], n_refs: int, max_new: int, seed: list[int]):
    """``n_refs`` teacher samples per prompt as Rouge-L reference texts (as the task draws its own)."""
    repeated = [p for p in prompts for _ in range(n_refs)]
    samples = lang.sample_continuations(repeated, max_new, np.random.default_rng(seed))
    texts = [lang.token_to_text(r) for r, _ in samples]
    return [texts[i * n_refs : (i + 1) * n_refs] for i in range(len(prompts))]


def spread(
    models: list[torch.nn.Module], draw: Callable[[int], object], score: Callable[[torch.nn.Module, object], dict],
    replicates: int,
) -> tuple[dict[str, list[float]], float]:
    """Score every model on ``draw(r)`` for every replicate: the values per key, and the mean seconds of one score.

    The first model's values are keyed as ``score`` returns them; with a second model, their paired differences
    (first minus second, on the same draw) are added as ``<key> (difference)``.
    """
    values: dict[str, list[float]] = {}
    seconds = 0.0
    for r in range(replicates):
        data = draw(r)
        start = time.perf_counter()
        scored = [score(model, data) for model in models]
        seconds += (time.perf_counter() - start) / len(models)
        for key, value in scored[0].items():
            values.setdefault(key, []).append(value)
            if len(scored) > 1:
                values.setdefault(f"{key} (difference)", []).append(value - scored[1][key])
    return values, seconds / replicates


def teacher_forced_rows(models, task: Task, lang, cfg: RunConfig, sizes, replicates: int) -> list[tuple]:
    """Rows of the teacher-forced metrics: held-out teacher samples redrawn per replicate."""
    rows = []
    for n, k in sizes:

        def draw(r: int) -> tuple[list[list[int]], list[list[int]]]:
            prompts = draw_prompts(lang, n, [cfg.task.data_seed, 1, r])
            repeated = [p for p in prompts for _ in range(k)]
            rng = np.random.default_rng([cfg.task.data_seed, 2, r])
            return repeated, [resp for resp, _ in lang.sample_continuations(repeated, task.max_new_tokens, rng)]

        def score(model, heldout) -> dict[str, float]:
            return teacher_forced_kl(model, task.teacher, *heldout, cfg.eval.batch_size, task.vocab_size)

        values, seconds = spread(models, draw, score, replicates)
        rows += [(f"teacher-forced {key}", n, f"{k} held-out", vals, seconds) for key, vals in values.items()]
    return rows


def sampled_rows(models, task: Task, lang, cfg: RunConfig, sizes, replicates: int) -> list[tuple]:
    """Rows of the sampled metrics: the student's samples redrawn (other sampling seeds) per replicate."""
    rows = []
    ev = cfg.eval
    for n, s in sizes:

        def draw(r: int) -> tuple[list[list[int]], list[list[str]], list[int]]:
            prompts = draw_prompts(lang, n, [cfg.task.data_seed, 1, r])
            references = draw_references(
                lang, prompts, cfg.task.n_references, task.max_new_tokens, [cfg.task.data_seed, 3, r]
            )
            return prompts, references, [SEED_BASE + 1000 * r + j for j in range(s)]

        def score(model, drawn) -> dict[str, float]:
            prompts, references, seeds = drawn
            metrics = evaluate_decodings(
                model, task.teacher, prompts, references, task.decode, decode_top_p=ev.decode_top_p,
                eos_token_id=task.eos_token_id, pad_token_id=task.pad_token_id, max_new_tokens=task.max_new_tokens,
                seeds=seeds, temperature=ev.temperature, batch_size=ev.batch_size, vocab_size=task.vocab_size,
            )
            kept = ("/teacher_nll", "/rougeL")
            out = {k.replace("eval", "val", 1): float(v) for k, v in metrics.items() if k.endswith(kept)}
            onpolicy = [
                on_policy_reverse_kl_of_model(
                    model, task.teacher, prompts, task.max_new_tokens, task.pad_token_id, seed + 500,
                    top_p=ev.decode_top_p[0], batch_size=ev.batch_size, vocab_size=task.vocab_size,
                )["eval/onpolicy_kl"]
                for seed in seeds
            ]
            return {**out, "val/onpolicy_kl": float(np.mean(onpolicy))}

        values, seconds = spread(models, draw, score, replicates)
        rows += [(f"sampled {key}", n, f"{s} seeds", vals, seconds) for key, vals in values.items()]
    return rows


def table(rows: list[tuple]) -> str:
    """The markdown table, grouped by quantity."""
    lines = [
        "| quantity | prompts | draws per prompt | mean | std over replicates | min-max | s per validation |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, n, draws, vals, seconds in sorted(rows, key=lambda row: row[0]):
        std = statistics.stdev(vals) if len(vals) > 1 else 0.0
        lines.append(
            f"| {name} | {n} | {draws} | {statistics.fmean(vals):.4f} | {std:.4f} | "
            f"{min(vals):.4f}-{max(vals):.4f} | {seconds:.2f} |"
        )
    return "\n".join(lines)


def pairs(text: str) -> list[tuple[int, int]]:
    """``"100:1,100:4"`` -> ``[(100, 1), (100, 4)]``."""
    return [tuple(int(x) for x in item.split(":")) for item in text.split(",") if item]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", help="a run's student.safetensors or an SFT start (sft_starts/<digest>.safetensors)")
    parser.add_argument("--versus", help="a second student: rows of the paired difference (student minus this one)")
    parser.add_argument("--sft-steps", type=int, default=1000, help="BC updates of the student without --student")
    parser.add_argument("--replicates", type=int, default=8, help="validation draws per setting")
    parser.add_argument("--heldout", default="100:1,100:4,100:16,400:4", help="prompts:held-out samples per prompt")
    parser.add_argument("--sampled", default="100:1,100:4,100:16,400:4", help="prompts:sampling seeds")
    parser.add_argument("--quick", action="store_true", help="3 replicates, 100:1,100:4 for both (a smoke run)")
    parser.add_argument("overrides", nargs="*", help="experiments/run.py overrides (task=..., model=..., seed=...)")
    args = parser.parse_args()
    if args.quick:
        args.replicates, args.heldout, args.sampled = 3, "100:1,100:4", "100:1,100:4"
    cfg = compose_run_config(CONF_DIR, ["progress=false", *args.overrides])
    apply_threads(cfg.threads)
    task = build_task(cfg)
    if not isinstance(task.teacher, SyntheticLanguage):
        raise SystemExit(
            f"validation_noise needs a synthetic task (it draws more prompts); task={cfg.task.name} is not one"
        )
    models = [fixed_student(cfg, task, args.student, args.sft_steps)]
    if args.versus:
        models.append(fixed_student(cfg, task, args.versus, args.sft_steps))
    rows = teacher_forced_rows(models, task, task.teacher, cfg, pairs(args.heldout), args.replicates)
    rows += sampled_rows(models, task, task.teacher, cfg, pairs(args.sampled), args.replicates)
    student = args.student or f"{args.sft_steps} BC steps at lr {cfg.sft_lr}, seed {cfg.seed}"
    if args.versus:
        student += f" minus {args.versus}"
    print(f"task {cfg.task.name}, student: {student}, {args.replicates} replicates per row, "
          f"decode_top_p {cfg.eval.decode_top_p}, {torch.get_num_threads()} torch thread(s)\n")
    print(table(rows))


if __name__ == "__main__":
    main()
