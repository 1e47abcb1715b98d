"""How sparse is the teacher on its own data? Top-p set sizes and the mass of its top-k tokens.

Teacher-forces the first ``--n`` trajectories of a task's offline data (generate them first with
``experiments/generate.py``) and prints, over all response states, the distribution of top-p set sizes for
several p and the mean probability mass of the teacher's top-1/7/50 tokens (the paper's notes: "the top 50
tokens hold ~96% of the mass, the top 7 >= 90%").

    python experiments/teacher_sparsity.py task=smollm2 [+n=40]
    python experiments/teacher_sparsity.py task=synthetic_lm +n=400     # any task, synthetic ones included
"""

from __future__ import annotations


import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from tokenrl.run.config import make_run_config, register_configs
from tokenrl.core.padding import right_pad
from tokenrl.tasks.datagen import load_teacher_data
from tokenrl.core.top_p import top_p_mask
from tokenrl.run.context import apply_threads
from tokenrl.run.inputs import build_task, data_location

register_configs()
P_VALUES = (0.5, 0.8, 0.9, 0.95)
TOP_K = (1, 7, 50)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    resolved = OmegaConf.to_container(cfg, resolve=True)
    n = int(resolved.pop("n", 40))  # this script's own option, not a run setting
    run_cfg = make_run_config(resolved)
    apply_threads(run_cfg.threads)
    task = build_task(run_cfg)
    buffer = load_teacher_data(data_location(run_cfg, task), task.manifest)
    sizes = {p: [] for p in P_VALUES}
    mass = {k: [] for k in TOP_K}
    for i in range(min(n, len(buffer))):
        prompt, response = buffer.prompts[i].tolist(), buffer.responses[i].tolist()
        tokens, lengths = right_pad([prompt + response], task.pad_token_id)
        logits = task.teacher.sequence_logits(tokens, lengths)[0, len(prompt) - 1 : len(prompt) - 1 + len(response)]
        for p in P_VALUES:
            sizes[p].append(top_p_mask(logits, p).sum(-1).numpy())
        probs = torch.softmax(logits.double(), -1).sort(-1, descending=True).values
        for k in TOP_K:
            mass[k].append(probs[:, :k].sum(-1).numpy())
    n_states = sum(len(x) for x in sizes[P_VALUES[0]])
    print(f"teacher: {task.manifest['teacher']}; {min(n, len(buffer))} trajectories, {n_states} response states")
    print("| p | mean set size | p50 | p90 | p99 | max | single-token sets |")
    print("|---|---|---|---|---|---|---|")
    for p in P_VALUES:
        s = np.concatenate(sizes[p])
        q = np.percentile(s, [50, 90, 99])
        print(f"| {p} | {s.mean():.1f} | {q[0]:.0f} | {q[1]:.0f} | {q[2]:.0f} | {s.max()} | {(s == 1).mean():.1%} |")
    print("\n| top-k tokens | mean teacher mass | states with mass >= 0.9 |")
    print("|---|---|---|")
    for k in TOP_K:
        m = np.concatenate(mass[k])
        print(f"| {k} | {m.mean():.3f} | {(m >= 0.9).mean():.1%} |")


if __name__ == "__main__":
    main()
