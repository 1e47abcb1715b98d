"""An outside RL library on the registered teacher env: sb3-contrib's MaskablePPO against the zoo's students.

Usage (needs sb3-contrib, a dev extra: ``pip install -e ".[dev]"`` or ``pip install sb3-contrib``)::

    python experiments/maskable_ppo.py                        # vs an untrained student and the SFT start
    python experiments/maskable_ppo.py --run outputs/DATE/TIME_synthetic_kd   # ... and that run's student
    python experiments/maskable_ppo.py --timesteps 100000 --set eval.seeds=[0,1]

What it does, at the defaults in 96 s of CPU time (one thread; the SFT start included, 67 s when it is reused;
6.4 min of wall-clock on 2 cores shared with about 10 other processes):

1. the zoo side: the run config (``--run``'s ``config.yaml``, or the defaults of ``experiments/run.py`` with
   ``--set key=value`` overrides) with ``algo=bc steps=0`` is run once into ``<out>/sft_start`` (reused when it
   is there): its student is the SFT start every zoo algorithm begins from, and its ``metrics.json`` holds the
   zoo's own evaluation of the teacher, the untrained student and the SFT start;
2. MaskablePPO (``MultiInputPolicy``: an MLP over the one-hot observation) trains on
   ``gymnasium.make_vec("tokenrl/SyntheticDistill-v0", vectorization_mode="vector_entry_point", ...)`` for that
   config's task, through :class:`envs.sb3.SB3VecEnv`: actions masked to the teacher's top-p set (``--top-p``),
   reward log pi*(a|s), so its return is the response's teacher log-likelihood;
3. every policy becomes a token policy (the batched env's observation -> next-token log-probs ``[B, V]``): the
   PPO policy is its masked distribution (the masks from the teacher, as in training), a zoo student its
   causal LM's unrestricted next-token distribution (as the zoo samples it), the teacher its own;
4. each is evaluated the same way (:func:`evaluate_token_policy`) on the config's test prompts
   (``eval.n_prompts``) with each seed of ``eval.seeds`` at temperature 1: teacher NLL per response token
   (:func:`tokenrl.evaluation.metrics.teacher_nll`), on-policy reverse KL per token
   (:func:`tokenrl.evaluation.onpolicy.on_policy_reverse_kl`, on the same samples) and response length, means
   over seeds. The "zoo" columns repeat the zoo's numbers from ``metrics.json`` (``eval/teacher_nll``,
   ``eval/onpolicy_kl``, ``eval/response_len``: the same quantities on other random draws) as a check.

Prints one table (markdown) and writes it with the numbers to ``<out>/maskable_ppo.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
from omegaconf import OmegaConf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

try:
    import sb3_contrib
    from stable_baselines3.common.vec_env import VecMonitor
except ImportError as error:  # a dev extra: say how to get it instead of a bare traceback
    raise SystemExit(
        f"experiments/maskable_ppo.py needs sb3-contrib ({error}); install it with "
        '`pip install -e ".[dev]"` or `pip install sb3-contrib`.'
    ) from None

import gymnasium as gym  # noqa: E402
import transformers  # noqa: E402

import envs  # noqa: E402,F401  (registers the ids)
from envs.distill import DistillSource, synthetic_source  # noqa: E402
from envs.sb3 import SB3VecEnv  # noqa: E402
from envs.token_env import BatchedTokenGenerationEnv  # noqa: E402
from tokenrl.core.top_p import top_p_mask  # noqa: E402
from tokenrl.evaluation.teacher_forced import teacher_nll  # noqa: E402
from tokenrl.evaluation.onpolicy import on_policy_reverse_kl  # noqa: E402
from tokenrl.lm.sampling import KVCacheStepper  # noqa: E402
from tokenrl.run.config import RunConfig, make_run_config  # noqa: E402
from tokenrl.run.context import apply_threads  # noqa: E402
from tokenrl.run.inputs import build_student, build_task  # noqa: E402
from tokenrl.run.trainer import run  # noqa: E402
from tokenrl.tasks.base import SyntheticTaskConfig  # noqa: E402

TokenPolicy = Callable[[dict[str, torch.Tensor]], torch.Tensor]
"""``policy(obs) -> logp_BV``: next-token log-probs ``[B, V]`` at the states of the batched env's observation
(``tokens_BL``, ``lengths_B``, ``prompt_lengths_B``)."""


def teacher_token_policy(source: DistillSource) -> TokenPolicy:
    """The teacher's own next-token distribution (its on-policy KL is 0, its NLL its entropy rate)."""

    def policy(obs: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.log_softmax(source.teacher.next_token_logits(obs["tokens_BL"], obs["lengths_B"]).double(), -1)

    return policy


def causal_lm_token_policy(model: torch.nn.Module, source: DistillSource) -> TokenPolicy:
    """A zoo student: its causal LM's full next-token distribution (the generation engine's logits)."""
    stepper = KVCacheStepper(model.eval(), source.pad_token_id, source.vocab_size)

    def policy(obs: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(stepper.next_token_logits(obs["tokens_BL"], obs["lengths_B"]).double(), -1)

    return policy


def ppo_token_policy(model: sb3_contrib.MaskablePPO, source: DistillSource, top_p: float) -> TokenPolicy:
    """The PPO policy's distribution at the env's observation, masked to the teacher's top-p set as in training."""
    width = source.max_prompt_len + source.max_new_tokens

    def policy(obs: dict[str, torch.Tensor]) -> torch.Tensor:
        tokens_BL, lengths_B = obs["tokens_BL"], obs["lengths_B"]
        # The env's observation: the token array padded to its full width.
        tokens_BT = torch.full((tokens_BL.shape[0], width), source.pad_token_id, dtype=torch.long)
        tokens_BT[:, : tokens_BL.shape[1]] = tokens_BL
        sb3_obs = {"tokens": tokens_BT.numpy(), "length": lengths_B.numpy(), "prompt_length": obs["prompt_lengths_B"].numpy()}
        masks_BV = top_p_mask(source.teacher.next_token_logits(tokens_BL, lengths_B), top_p)
        obs_t, _ = model.policy.obs_to_tensor(sb3_obs)
        with torch.no_grad():
            logits_BV = model.policy.get_distribution(obs_t, action_masks=masks_BV.numpy()).distribution.logits
        return torch.log_softmax(logits_BV.double(), -1)

    return policy


def rollout_token_policy(
    policy: TokenPolicy, source: DistillSource, prompts: list[list[int]], seed: int
) -> tuple[list[list[int]], torch.Tensor, torch.Tensor]:
    """Sample one response per prompt from ``policy`` at temperature 1 in the batched env.

    Returns:
        ``(responses, logp_BT, mask_BT)``: the responses (EOS included when they ended with it), the policy's
        float64 log-prob of each of their tokens ``[B, T]`` (T = longest response; 0 on padding) and the bool
        mask of their tokens.
    """
    env = BatchedTokenGenerationEnv(
        source.vocab_size, source.eos_token_id, source.max_new_tokens, source.max_prompt_len,
        pad_token_id=source.pad_token_id,
    )
    obs, _ = env.reset(prompts, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    logp_steps = []
    done_B = torch.zeros(len(prompts), dtype=torch.bool)
    while not bool(done_B.all()):
        logp_BV = policy(obs)
        actions_B = torch.multinomial(logp_BV.exp(), 1, generator=generator)[:, 0]
        obs, _, terminated_B, truncated_B, info = env.step(actions_B)
        logp_steps.append(torch.where(info["active_B"], logp_BV.gather(1, actions_B[:, None])[:, 0], 0.0))
        done_B = terminated_B | truncated_B
    trajectories = env.trajectories()
    mask_BT = trajectories.response_mask_BT
    return trajectories.responses, torch.stack(logp_steps, 1)[:, : mask_BT.shape[1]], mask_BT


def evaluate_token_policy(
    policy: TokenPolicy, source: DistillSource, prompts: list[list[int]], seeds: list[int]
) -> dict[str, float]:
    """Teacher NLL per token, on-policy reverse KL per token and response length of ``policy``'s samples.

    Per seed: one response per prompt (:func:`rollout_token_policy`); the NLL and the KL are token-weighted
    within a seed, then every metric is averaged over the seeds (as :func:`tokenrl.evaluation.metrics.evaluate`).

    Returns:
        ``{"eval/teacher_nll", "eval/onpolicy_kl", "eval/response_len"}``.
    """
    nll, kl, length = [], [], []
    for seed in seeds:
        responses, student_logp_BT, mask_BT = rollout_token_policy(policy, source, prompts, seed)
        nll_arrays = teacher_nll(source.teacher, prompts, responses)
        teacher_logp_BT = torch.nn.utils.rnn.pad_sequence([torch.from_numpy(-a) for a in nll_arrays], batch_first=True)
        nll.append(float(np.concatenate(nll_arrays).mean()))
        kl.append(on_policy_reverse_kl(student_logp_BT, teacher_logp_BT, mask_BT))
        length.append(float(np.mean([len(r) for r in responses])))
    return {"eval/teacher_nll": float(np.mean(nll)), "eval/onpolicy_kl": float(np.mean(kl)), "eval/response_len": float(np.mean(length))}


def zoo_config(args: argparse.Namespace) -> RunConfig:
    """The run config of the zoo side: ``--run``'s, or the defaults; then ``--set``; then ``algo=bc steps=0``."""
    if args.run:
        base = OmegaConf.load(os.path.join(args.run, "config.yaml"))
    else:
        base = OmegaConf.create({"sft_steps": 500})  # experiments/conf/config.yaml's warm start
    raw = OmegaConf.to_container(OmegaConf.merge(base, OmegaConf.from_dotlist(args.set)), resolve=True)
    raw.update({"algo": {"name": "bc"}, "steps": 0, "progress": False, "resume": False})  # the SFT start alone
    cfg = make_run_config(raw)
    if not isinstance(cfg.task, SyntheticTaskConfig):
        raise SystemExit(f"the registered env is the synthetic teacher's; task {cfg.task.name!r} is not synthetic")
    return cfg


# Settings that do not change the SFT start's weights.
_NOT_THE_STUDENT = ("threads", "progress", "data_dir", "device")


def sft_start(cfg: RunConfig, sft_dir: str) -> dict:
    """Run ``cfg`` (``algo=bc steps=0``) into ``sft_dir`` unless it holds that run already; its metrics.

    Raises:
        SystemExit: ``sft_dir`` holds a run of another config.
    """
    path = os.path.join(sft_dir, "metrics.json")
    if not os.path.exists(path):
        run(cfg, sft_dir)
    with open(path) as f:
        metrics = json.load(f)
    wanted = json.loads(json.dumps(dataclasses.asdict(cfg)))
    differ = sorted(k for k in wanted if k not in _NOT_THE_STUDENT and metrics["config"].get(k) != wanted[k])
    if differ:
        raise SystemExit(f"{sft_dir} holds an SFT start of another config (keys {differ}); delete it or pass another --out")
    return metrics


def load_student(run_dir: str) -> torch.nn.Module:
    """The final student of an ``experiments/run.py`` run directory (its ``student/``)."""
    path = os.path.join(run_dir, "student")
    if not os.path.isdir(path):
        raise SystemExit(f"{run_dir} has no student/: pass the directory of a finished experiments/run.py run")
    return transformers.AutoModelForCausalLM.from_pretrained(path)


def train_ppo(cfg: RunConfig, args: argparse.Namespace) -> tuple[sb3_contrib.MaskablePPO, dict]:
    """MaskablePPO on the registered env of ``cfg.task``; returns the model and its training summary."""
    vector_env = gym.make_vec(
        "tokenrl/SyntheticDistill-v0", num_envs=args.n_envs, vectorization_mode="vector_entry_point",
        task=cfg.task, top_p=args.top_p, autoreset_mode="SameStep",
    )
    env = VecMonitor(SB3VecEnv(vector_env))
    model = sb3_contrib.MaskablePPO(
        "MultiInputPolicy", env, n_steps=args.n_steps, batch_size=args.batch_size, ent_coef=args.ent_coef,
        seed=args.seed, device="cpu",
    )
    start = time.perf_counter()
    model.learn(total_timesteps=args.timesteps)
    returns = [episode["r"] for episode in model.ep_info_buffer]
    return model, {
        "timesteps": model.num_timesteps,
        "train_s": time.perf_counter() - start,
        "last_100_episodes_return": float(np.mean(returns)),
        "last_100_episodes_len": float(np.mean([episode["l"] for episode in model.ep_info_buffer])),
    }


def table(rows: list[dict]) -> str:
    """The markdown table of the evaluation rows (ours, then the zoo's own numbers where it has them)."""
    keys = ("eval/teacher_nll", "eval/onpolicy_kl", "eval/response_len")
    lines = [
        "| policy | teacher NLL | on-policy KL | response length | zoo: teacher NLL | zoo: on-policy KL | zoo: length |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ours = [f"{row['ours'][k]:.3f}" for k in keys]
        zoo = [f"{row['zoo'][k]:.3f}" if row.get("zoo") and k in row["zoo"] else "-" for k in keys]
        lines.append(f"| {row['policy']} | " + " | ".join(ours + zoo) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=None, help="a finished experiments/run.py run directory (synthetic task)")
    parser.add_argument("--out", default="outputs/maskable_ppo", help="the SFT start run and the results")
    parser.add_argument("--set", nargs="*", default=[], help="run-config overrides, e.g. eval.seeds=[0,1] sft_steps=200")
    parser.add_argument("--timesteps", type=int, default=30_000, help="PPO environment steps")
    parser.add_argument("--n-envs", type=int, default=16, help="rows of the batched env")
    parser.add_argument("--n-steps", type=int, default=64, help="PPO rollout length per row")
    parser.add_argument("--batch-size", type=int, default=256, help="PPO minibatch size")
    parser.add_argument("--ent-coef", type=float, default=1.0, help="PPO entropy bonus (1: the reverse-KL objective)")
    parser.add_argument("--top-p", type=float, default=0.8, help="the env's mask: the teacher's top-p set")
    parser.add_argument("--seed", type=int, default=0, help="PPO seed")
    args = parser.parse_args(argv)

    cfg = zoo_config(args)
    apply_threads(cfg.threads)
    transformers.utils.logging.disable_progress_bar()  # its weight-loading bars would interleave with the table
    sft_dir = os.path.join(args.out, "sft_start")
    zoo = sft_start(cfg, sft_dir)
    task = build_task(cfg)
    source = synthetic_source(cfg.task, split="test")
    prompts = task.test_prompts[: cfg.eval.n_prompts]
    assert source.prompts == task.test_prompts, "the env's test split is the task's"

    model, ppo_summary = train_ppo(cfg, args)
    students = [
        ("teacher", teacher_token_policy(source), zoo.get("teacher_eval")),
        ("untrained student", causal_lm_token_policy(build_student(cfg.model, task, cfg.seed, "cpu"), source), zoo.get("init_eval")),
        (f"SFT start ({cfg.sft_steps} bc steps)", causal_lm_token_policy(load_student(sft_dir), source), zoo.get("final_eval")),
    ]
    if args.run:
        with open(os.path.join(args.run, "metrics.json")) as f:
            run_metrics = json.load(f)
        algo = run_metrics["config"]["algo"]["name"]
        students.append((f"{algo} (--run)", causal_lm_token_policy(load_student(args.run), source), run_metrics["final_eval"]))
    students.append((f"MaskablePPO ({ppo_summary['timesteps']} steps)", ppo_token_policy(model, source, args.top_p), None))
    rows = [
        {"policy": name, "ours": evaluate_token_policy(policy, source, prompts, list(cfg.eval.seeds)), "zoo": zoo_eval}
        for name, policy, zoo_eval in students
    ]
    text = table(rows)
    print(text)
    print(
        f"\n{len(prompts)} test prompts x seeds {list(cfg.eval.seeds)}; PPO: {ppo_summary['timesteps']} steps in "
        f"{ppo_summary['train_s']:.0f} s, last 100 episodes' return {ppo_summary['last_100_episodes_return']:.2f} "
        f"(length {ppo_summary['last_100_episodes_len']:.1f})"
    )
    result = {"rows": rows, "ppo": ppo_summary, "args": vars(args), "table": text}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "maskable_ppo.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
