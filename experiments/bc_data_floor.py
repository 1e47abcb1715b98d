"""The data floor of BC on a synthetic task: how close a student *could* get to the teacher from this data.

On the synthetic tasks the teacher's state is known exactly, so the best a student can do with the offline data
(sampled at top-p ``task.sample_top_p``) is bounded by a tabular estimator: count the data's actions per exact
state, smooth by ``lam`` per token, and measure KL(top-p teacher || estimate) per state, averaged over the data's
state visits. That is the quantity `eval/kl_set_teacher_student` measures for a trained student (there on held-out
states), so a student far above the floor is limited by its training or its capacity, not by the data.

    python experiments/generate.py task=synthetic_lm && python experiments/bc_data_floor.py task=synthetic_lm
"""

from __future__ import annotations

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from tokenrl.run.config import make_run_config, register_configs
from tokenrl.core.distributions import project_to_set
from tokenrl.tasks.datagen import load_teacher_data
from tokenrl.tasks.synthetic import SyntheticLanguage
from tokenrl.core.top_p import top_p_mask
from tokenrl.run.context import apply_threads
from tokenrl.run.inputs import build_task, data_location

register_configs()
LAMBDAS = (0.003, 0.01, 0.03, 0.1)


def tabular_floor(lang: SyntheticLanguage, prompts, responses, top_p: float, lams=LAMBDAS) -> dict[float, float]:
    """Visit-weighted KL(top-p teacher || add-``lam`` count estimate) per smoothing ``lam``."""
    counts = np.zeros((lang.n_states, lang.vocab_size))
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        if len(prompt) == 0:
            raise ValueError(f"trajectory {i} has an empty prompt; the synthetic tasks always start with a topic token")
        if len(response) == 0:
            continue
        tokens = torch.as_tensor(np.concatenate([prompt, response]), dtype=torch.long)[None]
        states = lang.states(tokens)[0].numpy()
        # the state before response token t is the state after the prefix that ends just before it
        np.add.at(counts, (states[len(prompt) - 1 : len(prompt) - 1 + len(response)], np.asarray(response)), 1)
    logp = torch.as_tensor(lang.log_emission_SV, dtype=torch.float64)
    t_p = project_to_set(logp, top_p_mask(logp, top_p), log=False).numpy()  # the data's sampling distribution
    visits = counts.sum(1)
    weights = visits / visits.sum()
    out = {}
    for lam in lams:
        est = (counts + lam) / (visits[:, None] + lam * lang.vocab_size)
        kl_S = np.where(t_p > 0, t_p * (np.log(np.where(t_p > 0, t_p, 1.0)) - np.log(est)), 0.0).sum(1)
        out[lam] = float(np.sum(weights * kl_S))
    return out


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    run_cfg = make_run_config(OmegaConf.to_container(cfg, resolve=True))
    apply_threads(run_cfg.threads)
    task = build_task(run_cfg)
    if not isinstance(task.teacher, SyntheticLanguage):
        raise SystemExit(f"bc_data_floor needs a synthetic task (exact states); task={run_cfg.task.name} is not one")
    buffer = load_teacher_data(data_location(run_cfg, task), task.manifest)
    temperature = float(task.manifest.get("temperature", 1.0))
    if temperature != 1.0:
        raise SystemExit(f"the data was sampled at temperature {temperature}; bc_data_floor assumes 1.0 (the teacher's own)")
    p = float(run_cfg.task.sample_top_p)
    floor = tabular_floor(task.teacher, buffer.prompts, buffer.responses, p)
    print(f"task {run_cfg.task.name}: {len(buffer)} trajectories, {buffer.n_tokens} response tokens, data top-p {p}")
    print("| smoothing lam | KL(top-p teacher || count estimate), visit-weighted |")
    print("|---|---|")
    for lam, value in floor.items():
        print(f"| {lam:g} | {value:.3f} |")


if __name__ == "__main__":
    main()
