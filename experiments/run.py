"""Train a student by any registered algorithm and report how close it gets to the teacher.

    python experiments/run.py                       # Bellman Distill on the synthetic task
    python experiments/run.py algo=bc               # swap the algorithm with one word
    python experiments/run.py algo=iql_bd algo.top_p=1.0 steps=200
    python experiments/run.py -m algo=bc,kd,iql_bd,soft_q seed=0,1,2
    torchrun --nproc_per_node=2 experiments/run.py hydra.run.dir=outputs/ddp   # data-parallel (README)

Artifacts go to Hydra's run directory (printed at the end): metrics.json, tb/, student.safetensors,
student/, checkpoints/, config.yaml, owner.json. Continue an interrupted run with `resume=true hydra.run.dir=<its dir>`.

The directory belongs to one run (:mod:`tokenrl.run.rundir`): nothing is written there before the config is
checked and the directory is found free, so conf/config.yaml turns off Hydra's own ``.hydra/`` copies (written
before any check, by every invocation, refused ones too) and opens Hydra's log file only when something is
logged; the trainer writes ``config.yaml`` (the resolved config) and ``owner.json`` (the config's identity, the
command, and one entry per resume) once the run is accepted.
"""

from __future__ import annotations

import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from tokenrl.run.config import make_run_config, refuse_unknown_algo, register_configs
from tokenrl.core.ranks import env_rank
from tokenrl.run.trainer import run

register_configs()


def _summary(metrics: dict, out_dir: str) -> str:
    keys = ["eval/teacher_nll", "eval/rougeL", "eval/kl_student_teacher", "eval/onpolicy_kl", "eval/response_len"]
    rows = [
        ("teacher", metrics.get("teacher_eval")),
        ("untrained", metrics.get("init_eval")),
        ("SFT init", metrics.get("sft_eval")),
        (metrics["algo"], metrics.get("final_eval")),
    ]
    lines = [f"{'':>12} " + " ".join(f"{k.split('/')[1]:>22}" for k in keys)]
    for name, ev in rows:
        if ev:
            lines.append(f"{name:>12} " + " ".join(f"{ev.get(k, float('nan')):>22.4f}" for k in keys))
    t = metrics["train"]
    lines.append(f"train {t['steps']} steps in {t['train_s']:.1f}s; data {t['data_s']:.1f}s; outputs in {out_dir}")
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    out_dir = HydraConfig.get().runtime.output_dir  # under torchrun pass hydra.run.dir so that all ranks share it
    metrics = run(make_run_config(cfg), out_dir)
    if env_rank() == 0:
        print(_summary(metrics, out_dir))
    return float(metrics["final_eval"]["eval/teacher_nll"])


if __name__ == "__main__":
    refuse_unknown_algo(sys.argv[1:], os.path.join(os.path.dirname(os.path.abspath(__file__)), "conf"))
    main()
