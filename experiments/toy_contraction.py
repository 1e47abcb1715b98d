"""Propositions 1-4 of the top-p MDP, measured on random tabular MDPs.

For every p it prints one markdown table row: the mean top-p set size, the largest measured contraction
modulus of B_p and B_p^pi (Prop. 1: <= gamma), the largest gap ||Q* - Q_p*||_inf on supported pairs against
kappa(p) (Prop. 4), and the fraction of MDPs where the bound and the sandwich Q^{proj pi*} <= Q_p* <= Q*
(Props. 2-3) hold. It also plots ||Q_k - Q_p*||_inf / ||Q_0 - Q_p*||_inf along value iteration (worst MDP)
against gamma^k.

    python experiments/toy_contraction.py --n-mdps 100 --gamma 0.99 --out toy_contraction.png
"""

from __future__ import annotations

import argparse
import math
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

from envs.toy_mdps import TabularMDP, random_mdp  # noqa: E402
from tokenrl.core.progress import track  # noqa: E402
from tokenrl.theory.tabular import (  # noqa: E402
    contraction_modulus,
    kappa,
    soft_bellman,
    soft_bellman_eval,
    soft_optimal_policy,
    soft_policy_evaluation,
    soft_value_iteration,
    top_p_support,
)

# Slack for float rounding when checking the inequalities.
ATOL = 1e-8
# Value iteration is followed until the error has shrunk by this factor (or reached float noise).
PLOT_REDUCTION = 1e-12


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-mdps", type=int, default=100, help="number of random MDPs")
    parser.add_argument("--n-states", type=int, default=8, help="states per MDP")
    parser.add_argument("--n-actions", type=int, default=6, help="actions per MDP")
    parser.add_argument("--gamma", type=float, default=0.99, help="discount (the paper's 0.99 by default)")
    parser.add_argument("--p", type=float, nargs="+", default=[0.5, 0.8, 0.9, 0.95, 1.0], help="top-p values")
    parser.add_argument("--n-pairs", type=int, default=3, help="random (Q1, Q2) pairs per MDP and p for Prop. 1")
    parser.add_argument("--n-plot", type=int, default=10, help="MDPs whose value-iteration curves are plotted")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="toy_contraction.png", help="path of the PNG plot")
    args = parser.parse_args()
    if min(args.n_mdps, args.n_pairs, args.n_plot) < 1:
        parser.error("--n-mdps, --n-pairs and --n-plot must be >= 1")
    return args


def q_pairs(rng: np.random.Generator, shape: tuple[int, int], n_pairs: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Random (Q1, Q2) pairs: one constant shift (where Prop. 1 is tight), the rest random perturbations."""
    pairs = []
    for i in range(n_pairs):
        q1_SA = rng.normal(scale=5.0, size=shape)
        delta_SA = np.ones(shape) if i == 0 else rng.normal(size=shape)
        pairs.append((q1_SA, q1_SA + delta_SA))
    return pairs


def solve_soft_optimal(mdp: TabularMDP, support_SA: np.ndarray | None) -> np.ndarray:
    """``[S, A]`` fixed point of B_p to float precision: value iteration, then one soft policy-iteration step.

    Value iteration stops up to ``gamma / (1 - gamma) * tol`` away from the fixed point, which would show as a
    floor in the plot; evaluating its Boltzmann policy exactly is a Newton step, whose error is quadratic.
    """
    q_vi_SA, _ = soft_value_iteration(mdp.r_SA, mdp.P_SAS, mdp.gamma, support_SA, mdp.terminal_S, tol=1e-12)
    pi_SA = soft_optimal_policy(q_vi_SA, support_SA)
    return soft_policy_evaluation(pi_SA, mdp.r_SA, mdp.P_SAS, mdp.gamma, support_SA, mdp.terminal_S)


def error_curve(mdp: TabularMDP, support_SA: np.ndarray, q_p_SA: np.ndarray, n_iters: int) -> np.ndarray:
    """``[n_iters + 1]`` relative error ``||Q_k - Q_p*|| / ||Q_0 - Q_p*||`` (supported pairs) from ``Q_0 = 0``."""
    live_SA = support_SA & ~mdp.terminal_S[:, None]
    q_SA = np.zeros_like(q_p_SA)
    errors = []
    for _ in range(n_iters + 1):
        errors.append(np.max(np.abs(q_SA - q_p_SA)[live_SA]))
        q_SA = soft_bellman(q_SA, mdp.r_SA, mdp.P_SAS, mdp.gamma, support_SA, mdp.terminal_S)
    errors_K = np.array(errors)
    return errors_K / errors_K[0]


def main() -> None:
    args = parse_args()
    start = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    gamma = args.gamma
    n_plot_iters = math.ceil(math.log(PLOT_REDUCTION) / math.log(gamma)) if gamma > 0 else 1
    stats = {p: {"size": [], "mod_opt": [], "mod_eval": [], "gap": [], "bound": [], "sandwich": []} for p in args.p}
    curves = {p: [] for p in args.p}

    for i in track(range(args.n_mdps), "MDPs"):
        # Every other MDP has an absorbing terminal state, so both kinds are covered.
        mdp = random_mdp(args.n_states, args.n_actions, rng, gamma=gamma, n_terminal=i % 2)
        r_SA, P_SAS, terminal_S = mdp.r_SA, mdp.P_SAS, mdp.terminal_S
        q_star_SA = solve_soft_optimal(mdp, support_SA=None)
        pi_star_SA = soft_optimal_policy(q_star_SA)
        for p in args.p:
            support_SA = top_p_support(pi_star_SA, p)
            live_SA = support_SA & ~terminal_S[:, None]
            q_p_SA = solve_soft_optimal(mdp, support_SA)
            q_proj_SA = soft_policy_evaluation(pi_star_SA, r_SA, P_SAS, gamma, support_SA, terminal_S)

            def opt(q_SA: np.ndarray) -> np.ndarray:
                return soft_bellman(q_SA, r_SA, P_SAS, gamma, support_SA, terminal_S)

            def ev(q_SA: np.ndarray) -> np.ndarray:
                return soft_bellman_eval(q_SA, pi_star_SA, r_SA, P_SAS, gamma, support_SA, terminal_S)

            pairs = q_pairs(rng, r_SA.shape, args.n_pairs)
            gap = np.max(np.abs(q_star_SA - q_p_SA)[live_SA])
            row = stats[p]
            row["size"].extend(support_SA[~terminal_S].sum(-1))
            row["mod_opt"].append(max(contraction_modulus(opt, q1, q2, support_SA) for q1, q2 in pairs))
            row["mod_eval"].append(max(contraction_modulus(ev, q1, q2, support_SA) for q1, q2 in pairs))
            row["gap"].append(gap)
            row["bound"].append(gap <= kappa(p, gamma) + ATOL)
            row["sandwich"].append(
                bool(np.all(q_proj_SA[live_SA] <= q_p_SA[live_SA] + ATOL))
                and bool(np.all(q_p_SA[live_SA] <= q_star_SA[live_SA] + ATOL))
            )
            if i < args.n_plot:
                curves[p].append(error_curve(mdp, support_SA, q_p_SA, n_plot_iters))

    print(
        f"{args.n_mdps} random MDPs, S={args.n_states}, A={args.n_actions}, gamma={gamma}, seed={args.seed} "
        f"(moduli over {args.n_pairs} Q-pairs per MDP; should be <= gamma)\n"
    )
    columns = ["p", "mean abs(A_p)", "max modulus B_p", "max modulus B_p^pi", "max gap Q*-Q_p*", "kappa(p)"]
    columns += ["bound held", "sandwich held"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for p in args.p:
        row = stats[p]
        print(
            f"| {p:g} | {np.mean(row['size']):.2f} | {max(row['mod_opt']):.4f} | {max(row['mod_eval']):.4f} "
            f"| {max(row['gap']):.4f} | {kappa(p, gamma):.4f} | {np.mean(row['bound']):.2f} "
            f"| {np.mean(row['sandwich']):.2f} |"
        )

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ks = np.arange(n_plot_iters + 1)
    for p in args.p:
        # Once value iteration reaches float noise the error can be exactly 0, which a log axis cannot show.
        worst_K = np.max(np.stack(curves[p]), axis=0)
        ax.semilogy(ks, np.maximum(worst_K, 1e-17), label=f"p={p:g}")
    ax.semilogy(ks, gamma**ks, "k--", label=r"$\gamma^k$")
    ax.set_xlabel("value-iteration step k")
    ax.set_ylabel(r"$\|Q_k - Q_p^*\|_\infty / \|Q_0 - Q_p^*\|_\infty$ (worst MDP)")
    ax.set_title(f"Top-p soft value iteration, gamma={gamma}, {len(curves[args.p[0]])} MDPs")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"\nplot: {args.out}; runtime {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
