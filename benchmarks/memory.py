"""Peak resident memory of each stage of a run: task build, data generation, one training step, evaluation.

Every stage runs in a fresh subprocess that builds what the stage needs (as a run holds it: teacher,
student, data) and then runs the stage; the child reports its peak resident set size (``VmHWM``) after
the setup and after the stage. The table prints both and their difference ("stage adds"), in MB.

Two workloads:

* ``random150k``: a random 2-layer Llama teacher (output layer sharpened so its top-p sets are small, as an
  instruct LM's) and a random 2-layer Llama student at vocabulary 150,000, hidden size 256 (no download).
  Data generation samples 32 prompts x 32 tokens and stores their top-0.8 cache; the training step is one
  ``iql_bd`` update on 8 x 64 response tokens. Evaluation is measured at several held-out sizes (``--heldout N,L``: ``N`` held-out
  sequences of an 8-token prompt and ``L`` response tokens), to show how its peak grows with the number and
  length of the held-out sequences.
* ``smollm2`` (``--smollm2``): the SmolLM2 task exactly as ``experiments/run.py task=smollm2 model=pruned
  model.keep_every=3`` composes it. Needs the GGUF (``bash scripts/fetch_smollm2.sh``) and, for the
  training and evaluation stages, the data of ``python experiments/generate.py task=smollm2`` under
  ``data_dir`` (``TOKENRL_DATA_DIR``); its data-generation stage writes a fresh 8-prompt dataset to a
  temporary directory.

    python benchmarks/memory.py                             # random150k, held-out 16x64, 32x64, 16x128
    python benchmarks/memory.py --smollm2 --heldout 16,64    # plus the SmolLM2 task
    python benchmarks/memory.py --smollm2 --skip-random --stages evaluation
    python benchmarks/memory.py --smollm2 --skip-random --stages "training step" \
        --smollm2-override model.gradient_checkpointing=false       # the step without activation checkpointing
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 150_000
STAGES = ("task build", "data generation", "training step", "evaluation")


def _vm_hwm_mb() -> float:
    """Peak resident set size of this process so far, MB (Linux ``/proc/self/status`` VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status: this benchmark needs Linux")


# --------------------------------------------------------------------------------------------------
# random150k: random Llamas at vocabulary 150k
# --------------------------------------------------------------------------------------------------
def _random_llama(seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=False, eos_token_id=0,
        pad_token_id=0, bos_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


def _random_teacher():
    import torch
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from tokenrl.lm.models import HFTeacher

    vocab = {"<eos>": 0, **{f"t{i}": i for i in range(1, VOCAB)}}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<eos>")))
    tokenizer.eos_token = tokenizer.pad_token = "<eos>"
    model = _random_llama(seed=0)
    # A random Llama's next-token distribution is near uniform (top-0.8 sets of ~120k tokens, a cache of
    # gigabytes); sharpened 20x its median top-0.8 set has ~4 tokens, like an instruct LM's.
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return HFTeacher(model, tokenizer, max_batch=8)


def _random_pairs(n: int, prompt_len: int, response_len: int, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    prompts = [rng.integers(1, VOCAB, size=prompt_len).tolist() for _ in range(n)]
    responses = [rng.integers(1, VOCAB, size=response_len).tolist() for _ in range(n)]
    return prompts, responses


def _random_stage(stage: str, heldout: tuple[int, int]):
    """Build the state the stage runs with (as a run holds it) and return the stage as a closure over it."""
    import numpy as np

    if stage == "task build":
        return _random_teacher

    if stage == "data generation":
        from tokenrl.tasks.datagen import generate_teacher_data
        from tokenrl.lm.sampling import sample_responses

        teacher = _random_teacher()
        prompts = _random_pairs(32, 8, 0, seed=1)[0]

        def sampler(prompts_, seed):
            responses = sample_responses(teacher.model, prompts_, 32, 0, 0, seed, batch_size=16, vocab_size=VOCAB)
            return [(r, bool(r) and r[-1] == 0) for r in responses]

        def run():
            with tempfile.TemporaryDirectory() as out_dir:
                generate_teacher_data(
                    teacher, sampler, prompts, out_dir, samples_per_prompt=1, cache_top_p=0.8, manifest={},
                    shard_prompts=16, cache_batch_size=8, progress=False,
                )

        return run

    if stage == "training step":
        from algorithms import make_algorithm
        from tokenrl.data.buffer import ReplayBuffer, TopPCache
        from tokenrl.lm.policy import CausalLMPolicy

        rng = np.random.default_rng(0)
        student = _random_llama(seed=1).train()
        algo = make_algorithm("iql_bd", CausalLMPolicy(student, VOCAB), {}, total_steps=10)
        buffer = ReplayBuffer(pad_id=0, cache_top_p=0.8)
        for prompt, response in zip(*_random_pairs(8, 8, 64, seed=2)):
            # Set sizes like an instruct LM's top-0.8 sets; the data's action lies in its set.
            sizes = np.minimum(1 + rng.geometric(0.2, size=len(response) + 1), 64).astype(np.int32)
            sets = [rng.choice(np.arange(1, VOCAB), size=k, replace=False) for k in sizes]
            for t, action in enumerate(response):
                sets[t][0] = action
            ids = np.concatenate(sets).astype(np.int32)
            logprobs = np.concatenate([np.sort(np.log(rng.dirichlet(np.ones(k))))[::-1] for k in sizes])
            buffer.add([prompt], [response], [False], caches=[TopPCache(sizes, ids, logprobs.astype(np.float16))])
        batch = buffer.collate(list(range(len(buffer))), top_p=algo.top_p)
        return lambda: algo.update(batch)

    if stage == "evaluation":
        from tokenrl.evaluation.metrics import evaluate

        teacher, student = _random_teacher(), _random_llama(seed=1)
        prompts = _random_pairs(8, 8, 0, seed=3)[0]
        heldout_pairs = _random_pairs(heldout[0], 8, heldout[1], seed=4)

        def run():
            evaluate(
                student, teacher, prompts, None, str, eos_token_id=0, pad_token_id=0, max_new_tokens=16, seeds=[0],
                heldout=heldout_pairs, batch_size=64, vocab_size=VOCAB,
            )

        return run
    raise ValueError(f"unknown stage {stage!r}")


# --------------------------------------------------------------------------------------------------
# smollm2: the README's task
# --------------------------------------------------------------------------------------------------
def _smollm2_cfg(overrides: list[str]):
    from tokenrl.run.config import compose_run_config

    base = ["task=smollm2", "model=pruned", "model.keep_every=3", "algo=iql_bd", "batch_size=8"]
    return compose_run_config(os.path.join(ROOT, "experiments", "conf"), base + overrides)


def _smollm2_stage(stage: str, heldout: tuple[int, int], overrides: list[str]):
    import torch

    from tokenrl.run.context import apply_threads
    from tokenrl.run.inputs import build_student, build_task, data_location, load_data

    cfg = _smollm2_cfg(overrides)
    apply_threads(cfg.threads)
    if stage == "task build":
        return lambda: build_task(cfg)
    task = build_task(cfg)

    if stage == "data generation":
        from tokenrl.tasks.datagen import generate_teacher_data

        def run():
            with tempfile.TemporaryDirectory() as out_dir:
                generate_teacher_data(
                    task.teacher, task.data_sampler, task.train_prompts[:8], out_dir, samples_per_prompt=1,
                    cache_top_p=0.8, manifest=task.manifest, shard_prompts=8,
                    cache_batch_size=cfg.task.cache_batch_size, pad_id=task.pad_token_id, progress=False,
                )

        return run

    if not os.path.exists(os.path.join(data_location(cfg, task), "manifest.json")):
        raise RuntimeError(
            f"no SmolLM2 data at {data_location(cfg, task)}: run `python experiments/generate.py task=smollm2`"
        )
    buffer, _, _ = load_data(cfg, task)
    student = build_student(cfg.model, task, cfg.seed, "cpu")
    if stage == "training step":
        from algorithms import make_algorithm
        from tokenrl.lm.policy import CausalLMPolicy

        algo = make_algorithm(cfg.algo_name, CausalLMPolicy(student, task.vocab_size), cfg.algo_config(), total_steps=10)
        batch = buffer.sample(cfg.batch_size, torch.Generator().manual_seed(0), top_p=algo.top_p)
        return lambda: algo.update(batch)

    if stage == "evaluation":
        from tokenrl.evaluation.metrics import evaluate

        ev = cfg.eval

        def run():
            evaluate(
                student, task.teacher, task.test_prompts, task.test_references, task.decode,
                eos_token_id=task.eos_token_id, pad_token_id=task.pad_token_id, max_new_tokens=task.max_new_tokens,
                seeds=[0], temperature=ev.temperature, top_p=ev.top_p, heldout=task.heldout,
                batch_size=ev.batch_size, vocab_size=task.vocab_size,
            )

        return run
    raise ValueError(f"unknown stage {stage!r}")


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------
def _worker(workload: str, stage: str, heldout: tuple[int, int], threads: int, overrides: list[str]) -> None:
    import torch

    torch.set_num_threads(threads)
    run = _random_stage(stage, heldout) if workload == "random150k" else _smollm2_stage(stage, heldout, overrides)
    setup_mb = _vm_hwm_mb()
    start = time.time()
    run()
    print(json.dumps({"setup_mb": setup_mb, "peak_mb": _vm_hwm_mb(), "stage_s": time.time() - start}))


def _measure(workload: str, stage: str, heldout: tuple[int, int], threads: int, overrides: list[str]) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", workload, stage, f"{heldout[0]},{heldout[1]}"]
    cmd += [f"--smollm2-override={o}" for o in overrides]
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", ROOT), "TQDM_DISABLE": "1"}
    out = subprocess.run(cmd + ["--threads", str(threads)], capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["killed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heldout", nargs="+", default=["16,64", "32,64", "16,128"], help="N,L evaluation sizes (random150k)")
    ap.add_argument("--smollm2", action="store_true", help="also measure the SmolLM2 task")
    ap.add_argument("--skip-random", action="store_true", help="do not measure the random150k workload")
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES, help="stages to measure")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--smollm2-override", action="append", default=[], metavar="KEY=VALUE",
        help="extra run-config override of the SmolLM2 workload, e.g. model.gradient_checkpointing=false (repeatable)",
    )
    ap.add_argument("--worker", nargs=3, metavar=("WORKLOAD", "STAGE", "HELDOUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        workload, stage, heldout = args.worker
        _worker(workload, stage, tuple(int(x) for x in heldout.split(",")), args.threads, args.smollm2_override)
        return

    sizes = [tuple(int(x) for x in h.split(",")) for h in args.heldout]
    runs = [] if args.skip_random else [("random150k", stage, sizes[0]) for stage in STAGES[:-1]]
    runs += [] if args.skip_random else [("random150k", "evaluation", size) for size in sizes]
    if args.smollm2:
        runs += [("smollm2", stage, sizes[0]) for stage in STAGES]
    runs = [run for run in runs if run[1] in args.stages]
    print(f"Peak resident memory per stage, MB (VmHWM; fresh process per stage; threads={args.threads}).\n")
    print("| workload | stage | setup peak | stage peak | stage adds | stage time (s) |")
    print("|---|---|---:|---:|---:|---:|")
    for workload, stage, heldout in runs:
        label = f"{stage} (held-out {heldout[0]} x {heldout[1]})" if stage == "evaluation" and workload == "random150k" else stage
        r = _measure(workload, stage, heldout, args.threads, args.smollm2_override)
        if "error" in r:
            print(f"| {workload} | {label} | failed: {r['error'][:80]} | | | |", flush=True)
            continue
        print(
            f"| {workload} | {label} | {r['setup_mb']:.0f} | {r['peak_mb']:.0f} | {r['peak_mb'] - r['setup_mb']:.0f} "
            f"| {r['stage_s']:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
