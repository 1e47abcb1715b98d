"""Bellman Distill variants vs their SFT start: teacher NLL, both teacher-forced KLs and the on-policy reverse KL.

Reads finished run folders of ``experiments/run.py`` (``metrics.json`` + ``student.safetensors``) and prints,
per run, the SFT-start row and the final row. The teacher-forced metrics come from ``metrics.json``
(``sft_eval`` / ``final_eval``). The on-policy reverse KL ``E_{y ~ student}[log pi_s - log pi_t]`` per token
(:func:`tokenrl.evaluation.onpolicy.on_policy_reverse_kl_of_model`, student sampled at temperature 1, top-p 1,
on the test prompts, mean over sampling seeds 0-4) is computed here: for the final student from its saved
weights, for the SFT start by replaying the run's SFT warm start (same seed, same batches), checked against
the run's own ``sft_eval`` teacher NLL. The SFT start depends only on the seed, so it is replayed once per seed.

    python experiments/bd_fix_table.py /tmp/bdfix_runs/A_s0 /tmp/bdfix_runs/B_s0 ...
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
from safetensors.torch import load_model

from algorithms import make_algorithm
from tokenrl.run.config import make_run_config
from tokenrl.evaluation.onpolicy import on_policy_reverse_kl_of_model
from tokenrl.lm.policy import CausalLMPolicy
from tokenrl.evaluation.student import evaluate_student
from tokenrl.run.context import apply_threads
from tokenrl.run.inputs import build_student, build_task, load_data

KEYS = ("eval/teacher_nll", "eval/kl_student_teacher", "eval/kl_teacher_student")
ONPOLICY_SEEDS = (0, 1, 2, 3, 4)


def onpolicy_kl(model, task, n_prompts) -> float:
    prompts = task.test_prompts[:n_prompts] if n_prompts else task.test_prompts
    vals = [
        on_policy_reverse_kl_of_model(
            model, task.teacher, prompts, task.max_new_tokens, task.pad_token_id, seed, vocab_size=task.vocab_size
        )["eval/onpolicy_kl"]
        for seed in ONPOLICY_SEEDS
    ]
    return float(np.mean(vals))


def sft_start(cfg, task):
    """Replay the run's SFT warm start (tokenrl.run.trainer.warm_start with the run's generator): the SFT student."""
    buffer, _, _ = load_data(cfg, task)
    model = build_student(cfg.model, task, cfg.seed, cfg.device)
    policy = CausalLMPolicy(model, vocab_size=task.vocab_size)
    gen = torch.Generator().manual_seed(cfg.seed)
    sft = make_algorithm("bc", policy, {"lr": cfg.sft_lr}, total_steps=cfg.sft_steps)
    for _ in range(cfg.sft_steps):
        sft.update(buffer.sample(cfg.batch_size, gen).to(cfg.device))
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders with metrics.json and student.safetensors")
    parser.add_argument("--json", help="also write the table as JSON here")
    args = parser.parse_args()
    sft_cache: dict[int, float] = {}
    rows = []
    for run_dir in args.runs:
        with open(os.path.join(run_dir, "metrics.json")) as f:
            res = json.load(f)
        cfg = make_run_config(res["config"])
        apply_threads(cfg.threads)
        task = build_task(cfg)
        if cfg.seed not in sft_cache:
            model = sft_start(cfg, task)
            check = evaluate_student(model, task, cfg.eval, cfg.eval.seeds)["eval/teacher_nll"]
            if abs(check - res["sft_eval"]["eval/teacher_nll"]) > 1e-4:
                raise RuntimeError(f"SFT replay of seed {cfg.seed} does not reproduce the run ({check} vs "
                                   f"{res['sft_eval']['eval/teacher_nll']})")
            sft_cache[cfg.seed] = onpolicy_kl(model, task, cfg.eval.n_prompts)
        final = build_student(cfg.model, task, cfg.seed, cfg.device)
        load_model(final, os.path.join(run_dir, "student.safetensors"))
        shown = ("name", "alpha", "ce_coef", "mass_coef", "q_shift")
        algo_cfg = {k: v for k, v in res["config"]["algo"].items() if k in shown}
        row = {"run": run_dir, "seed": cfg.seed, "algo": algo_cfg}
        for stage, key in (("sft", "sft_eval"), ("final", "final_eval")):
            row[stage] = {k: res[key][k] for k in KEYS}
        row["sft"]["eval/onpolicy_kl"] = sft_cache[cfg.seed]
        row["final"]["eval/onpolicy_kl"] = onpolicy_kl(final, task, cfg.eval.n_prompts)
        rows.append(row)
        short = ("teacher_nll", "kl_st", "kl_ts", "onpolicy_kl")
        print(f"{run_dir}  seed {cfg.seed}  {algo_cfg}", flush=True)
        for stage in ("sft", "final"):
            vals = [row[stage][k] for k in (*KEYS, "eval/onpolicy_kl")]
            print(f"  {stage:5s} " + "  ".join(f"{n} {v:.4f}" for n, v in zip(short, vals)), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
