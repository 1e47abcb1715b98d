"""Do the on-policy methods improve on their SFT start? Short runs from the shared SFT start, printed as tables.

    python experiments/onpolicy_start.py --study lr --out runs/onpolicy_lr
    python experiments/onpolicy_start.py --study gkd_target --out runs/gkd_target
    python experiments/onpolicy_start.py --study lr --runs minillm:1e-4,gkd:1e-4 --out DIR -- steps=400

Two studies (issue 18), each a list of runs of ``experiments/run.py``'s trainer, one at a time in this process,
from the one SFT start every run of the seed shares (``selection.sft_cache``: trained by the first run, cached
under ``data_dir``):

* ``lr``: ``minillm`` and ``gkd`` (their shipped configs) at a few learning rates. Validation every
  ``--val-every`` steps and at step 0 (the SFT start itself): the table shows each validation next to the
  start's, and whether the first validation after the start is better on teacher NLL, on-policy KL and
  KL(student || teacher) (teacher-forced, exact on the synthetic task).
* ``gkd_target``: GKD's target is the full teacher (including the synthetic teacher's uniform smoothing floor)
  while its SFT start and its fixed-data half are top-p-0.8 teacher samples. GKD with ``top_p`` 1.0 (the paper's:
  JSD to the full teacher) and 0.8 (JSD on the teacher's top-p set) and ``lmbda`` 0 (teacher data only) and 0.5
  at the given lrs; the final evaluation (5 seeds, test prompts) next to the SFT start's at both decodings
  (``eval/``: top-p 1.0, ``eval_p0.8/``), with KL(teacher || student), KL(student || teacher), the student's mass
  outside the teacher's top-p set and the response length.

Every final table also has the student's mass on the synthetic teacher's **smoothing floor** ("floor mass": the
tokens outside the teacher's support, which the teacher gives only its uniform ``smoothing / V``) for the SFT start
(its cached weights) and each run: on the states of the held-out teacher samples (the teacher's own mass there
is in the header) and on the states of the student's own samples at top-p 1.0 (validation prompts, seed 0). A
student sampling at top-p 1.0 draws such a token with that probability, and the teacher scores it
``log(smoothing / V)`` (-8.1 nats on the default task), so this mass drives ``eval/teacher_nll`` at top-p 1.0.

``--runs`` replaces a study's list (``algo:lr`` pairs; ``gkd_target`` takes ``top_p:lmbda:lr`` triples);
arguments after ``--`` go to every run (``key=value`` as on ``experiments/run.py``'s command line). A run whose
``metrics.json`` exists is not run again, so the script resumes where it stopped; a run stopped by the
divergence guard is reported as such. Tables go to stdout and ``OUT/<study>.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tokenrl.core.distributions import masked_mean, project_to_set  # noqa: E402
from tokenrl.core.divergence import DivergenceError  # noqa: E402
from tokenrl.data.buffer import ReplayBuffer  # noqa: E402
from tokenrl.lm.policy import CausalLMPolicy  # noqa: E402
from tokenrl.lm.sampling import sample_responses  # noqa: E402
from tokenrl.lm.scoring import with_teacher_logprobs  # noqa: E402
from tokenrl.run.config import compose_algo, make_run_config  # noqa: E402
from tokenrl.run.inputs import build_student, build_task, data_location  # noqa: E402
from tokenrl.run.selection import read_sft_start, sft_cache_path  # noqa: E402
from tokenrl.run.trainer import run  # noqa: E402
from tokenrl.tasks.synthetic import SyntheticLanguage  # noqa: E402

CONF_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conf")
BASE = {  # the README's default run, shortened, with the shared SFT start and no reference evaluations
    "sft_steps": 500, "steps": 200, "threads": 1, "progress": False, "teacher_eval": False, "init_eval": False,
    "selection": {"sft_cache": True}, "checkpoint_seconds": 0,
}
STUDIES = {
    "lr": ["minillm:1e-3", "minillm:1e-4", "minillm:3e-5", "gkd:1e-3", "gkd:1e-4", "gkd:3e-5"],
    "gkd_target": [f"{p}:{lmbda}:{lr}" for lr in ("1e-4", "3e-5") for lmbda in ("0.5", "0.0") for p in ("1.0", "0.8")],
}
VAL_KEYS = (  # (metric key without its prefix, column header)
    ("teacher_nll", "NLL"), ("onpolicy_kl", "on-pol KL"), ("kl_student_teacher", "KL(s\\|\\|t)"),
    ("kl_teacher_student", "KL(t\\|\\|s)"), ("response_len", "len"), ("eos_rate", "EOS rate"),
)
IMPROVE_KEYS = ("teacher_nll", "onpolicy_kl", "kl_student_teacher")  # lower is better, all three
FINAL_KEYS = (
    ("eval/teacher_nll", "NLL p1.0"), ("eval_p0.8/teacher_nll", "NLL p0.8"), ("eval/onpolicy_kl", "on-pol KL"),
    ("eval/kl_teacher_student", "KL(t\\|\\|s)"), ("eval/kl_student_teacher", "KL(s\\|\\|t)"),
    ("eval/mass_outside_set", "mass out"), ("eval/response_len", "len p1.0"), ("eval_p0.8/response_len", "len p0.8"),
)


def run_config(study: str, spec: str, overrides: list[str], val_every: int) -> tuple[str, dict]:
    """``(label, config dict)`` of one run of ``study`` (``spec`` as in ``--runs``)."""
    if study == "lr":
        algo, lr = spec.split(":")
        label, run = f"{algo}_lr{lr}", {"algo": {**compose_algo(CONF_DIR, algo), "lr": float(lr)}}
        # val_every_s validates at step 0 (the SFT start) and at the end; val_every in between.
        run["eval"] = {"val_every": val_every, "val_every_s": 1e9}
    else:
        top_p, lmbda, lr = spec.split(":")
        label = f"gkd_p{top_p}_l{lmbda}_lr{lr}"
        run = {"algo": {**compose_algo(CONF_DIR, "gkd"), "top_p": float(top_p), "lmbda": float(lmbda), "lr": float(lr)}}
    # The command line's overrides come last: they change every run of the study.
    cfg = OmegaConf.merge(OmegaConf.create(BASE), run, OmegaConf.from_dotlist(overrides))
    return label, OmegaConf.to_container(cfg)


def run_once(label: str, cfg: dict, out: str) -> dict:
    """The run's ``metrics.json`` (run now unless it exists), or ``{"diverged": message}``."""
    out_dir = os.path.join(out, label)
    path = os.path.join(out_dir, "metrics.json")
    if not os.path.exists(path):
        try:
            run(make_run_config(cfg), out_dir)
        except DivergenceError as error:
            return {"diverged": f"update {error.step}, {error.term}"}
    with open(path) as f:
        return json.load(f)


def floor_masses(metrics: dict, weights: dict[str, torch.Tensor]) -> dict[str, float] | None:
    """Mean mass on the synthetic teacher's smoothing floor (the tokens it gives only ``smoothing / V``), per state
    where a token was chosen; None on another task.

    Returns:
        ``teacher_states``: the student's, on the held-out teacher samples; ``own_states``: the student's, on its
        own samples at top-p 1.0 (validation prompts, sampling seed 0), i.e. the share of floor tokens it draws
        there; ``teacher``: the teacher's own, on its samples.

    Args:
        metrics: a run's ``metrics.json`` (its ``config`` names the task and the student).
        weights: the student's state dict.
    """
    cfg = make_run_config(metrics["config"])
    task = build_task(cfg)
    lang = task.teacher
    if not isinstance(lang, SyntheticLanguage):
        return None
    model = build_student(cfg.model, task, cfg.seed, "cpu")
    model.load_state_dict(weights)
    model.eval()
    policy = CausalLMPolicy(model, task.vocab_size)
    floor_logp = math.log(lang.config.smoothing / lang.vocab_size) + 1e-4

    def masses(prompts: list[list[int]], responses: list[list[int]]) -> tuple[float, float]:
        buffer = ReplayBuffer(pad_id=task.pad_token_id)
        buffer.add(prompts, responses, [r[-1] == task.eos_token_id for r in responses])
        batch = with_teacher_logprobs(buffer.collate(list(range(len(buffer)))), lang, task.pad_token_id)
        T = batch.actions_BT.shape[1]  # the states where a token was chosen (not the one after the last)
        teacher_BTV = batch.teacher_logprobs_BSV[:, :T].double()
        with torch.no_grad():
            student_BTV = project_to_set(policy(batch)[:, :T].double(), log=False)
        floor_BTV = teacher_BTV < floor_logp
        mean = lambda probs_BTV: float(masked_mean((probs_BTV * floor_BTV).sum(-1), batch.action_mask_BT))  # noqa: E731
        return mean(student_BTV), mean(teacher_BTV.exp())

    on_teacher, teacher = masses(*task.heldout)
    own = sample_responses(
        model, task.val_prompts, task.max_new_tokens, task.eos_token_id, task.pad_token_id, seed=0,
        vocab_size=task.vocab_size,
    )
    return {"teacher_states": on_teacher, "own_states": masses(task.val_prompts, own)[0], "teacher": teacher}


def _sft_weights(metrics: dict) -> dict[str, torch.Tensor] | None:
    """The SFT start's weights from the shared cache (``selection.sft_cache``), or None when it is not there."""
    cfg = make_run_config(metrics["config"])
    task = build_task(cfg)
    path = sft_cache_path(cfg, task, data_location(cfg, task))
    return read_sft_start(path)["model"] if os.path.exists(path) else None


def lr_table(results: dict[str, dict]) -> str:
    """Validations (step 0 = the SFT start) per run, and whether the first one after the start is better."""
    header = "| run | step | " + " | ".join(h for _, h in VAL_KEYS) + " | better than start (NLL, on-pol KL, KL(s\\|\\|t)) |"
    lines = [header, "|" + "---|" * (len(VAL_KEYS) + 3)]
    for label, metrics in results.items():
        if "diverged" in metrics:
            lines.append(f"| {label} | | " + " | ".join("" for _ in VAL_KEYS) + f" | diverged ({metrics['diverged']}) |")
            continue
        records = metrics["validation"]
        start = records[0]
        for i, record in enumerate(records):
            verdict = ""
            if i == 1:
                verdict = ", ".join("yes" if record[f"val/{k}"] < start[f"val/{k}"] else "no" for k in IMPROVE_KEYS)
            cells = " | ".join(_fmt(record.get(f"val/{k}")) for k, _ in VAL_KEYS)
            lines.append(f"| {label} | {record['step']} | {cells} | {verdict} |")
    return "\n".join(lines)


def final_table(results: dict[str, dict], out: str) -> str:
    """The SFT start's and each run's final evaluation (test prompts, every seed) at both decodings, with the
    student's floor mass (:func:`floor_masses`)."""
    done = {label: m for label, m in results.items() if "diverged" not in m}
    floors = {
        label: floor_masses(metrics, load_file(os.path.join(out, label, "student.safetensors")))
        for label, metrics in done.items()
    }
    first = next(iter(done), None)
    if first is not None:
        sft_weights = _sft_weights(done[first])
        floors["SFT start"] = floor_masses(done[first], sft_weights) if sft_weights is not None else None
    teacher = next((f["teacher"] for f in floors.values() if f), None)
    headers = [h for _, h in FINAL_KEYS] + [f"floor mass: teacher states (teacher {_fmt(teacher)})", "floor mass: own states"]
    lines = ["| run | " + " | ".join(headers) + " |", "|" + "---|" * (len(headers) + 1)]

    def row(label: str, evaluation: dict) -> str:
        floor = floors.get(label) or {}
        cells = [_fmt(evaluation.get(k)) for k, _ in FINAL_KEYS] + [_fmt(floor.get(k)) for k in ("teacher_states", "own_states")]
        return f"| {label} | " + " | ".join(cells) + " |"

    if first is not None:
        lines.append(row("SFT start", done[first]["sft_eval"]))
    for label, metrics in results.items():
        if label in done:
            lines.append(row(label, metrics["final_eval"]))
        else:
            lines.append(f"| {label} | diverged ({metrics['diverged']}) |" + " |" * (len(headers) - 1))
    return "\n".join(lines)


def _fmt(value) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    overrides = argv[argv.index("--") + 1 :] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", choices=sorted(STUDIES), required=True)
    parser.add_argument("--runs", default=None, help="comma-separated run specs replacing the study's list")
    parser.add_argument("--val-every", type=int, default=50, help="validation interval in steps (study lr)")
    parser.add_argument("--out", required=True, help="folder of the runs and the table")
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    specs = args.runs.split(",") if args.runs else STUDIES[args.study]
    results = {}
    for spec in specs:
        label, cfg = run_config(args.study, spec, overrides, args.val_every)
        results[label] = run_once(label, cfg, args.out)
    table = lr_table(results) if args.study == "lr" else final_table(results, args.out)
    if args.study == "lr":
        table += "\n\nFinal evaluation (test prompts, every seed):\n\n" + final_table(results, args.out)
    print(table)
    with open(os.path.join(args.out, f"{args.study}.md"), "w") as f:
        f.write(f"python experiments/onpolicy_start.py {' '.join(argv)}\n\n{table}\n")


if __name__ == "__main__":
    main()
