"""Where TD imitation beats behaviour cloning, exactly: every objective's optimum over an aliased student.

    python experiments/aliased_students.py              # the full sweep and docs/aliased_students.png
    python experiments/aliased_students.py --quick      # two small settings, no plot

A student whose logits depend on a feature of the prefix (its last k tokens, or a hash bucket) cannot
represent a teacher that depends on the whole prefix (tokenrl/theory/aliasing.py). For every setting the script
solves each objective's exact optimum or fixed point over that student (tokenrl/theory/aliased_solvers.py) and
prints, under the student's own exact occupancy, its on-policy reverse KL per sequence and per token, its
forward KL on the teacher data's prefixes, its return under the teacher's log-likelihood reward, then the
winner, the margin to the runner-up, and the TD objectives against the better of BC and KD. The last table
is the summary (reverse KL per sequence of every objective in every setting). The plot shows the per-step
on-policy reverse KL along the student's own trajectories at the longest horizon. Findings: docs/aliased_students.md.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.ticker import MaxNLocator  # noqa: E402
import torch  # noqa: E402

from tokenrl.theory.aliased_solvers import SOLVERS, TD_OBJECTIVES  # noqa: E402
from tokenrl.theory.aliasing import evaluate, hash_features, last_k_features, make_aliased_problem  # noqa: E402
from tokenrl.theory.toy_language import make_topic_language, make_toy_language  # noqa: E402

COLS = ("rev_kl_seq", "rev_kl_tok", "fwd_kl_tok", "return_seq", "length", "off_data")
BASELINES = ("bc", "kd")
# The TD objectives that reach their solution through a Bellman fixed point (soft Q-learning, Bellman Distill);
# soft_q, the other TD objective, is the exact soft-optimal policy those fixed points stand in for.
TD_FIXED_POINTS = tuple(n for n in TD_OBJECTIVES if n != "soft_q")


@dataclass(frozen=True)
class Setting:
    """One point of the sweep: the language, the student's feature, the horizon, gamma and p."""

    group: str
    language: str = "topic"  # topic: make_topic_language (topic + last token); toy: make_toy_language (any prefix)
    seed: int = 0
    max_len: int = 4
    feature: str = "last1"  # lastK (the last K tokens; K >= max_len is the full state) or hashN (N buckets)
    gamma: float = 0.99
    p: float = 0.8

    @property
    def label(self) -> str:
        lang = "topic" if self.language == "topic" else "toy"
        return f"{lang}{self.seed} T={self.max_len} {self.feature} g={self.gamma} p={self.p}"


def sweep(quick: bool) -> list[Setting]:
    """One factor at a time around the base setting (topic language, T = 4, last token, gamma 0.99, p 0.8)."""
    if quick:
        return [Setting("quick", max_len=3), Setting("quick", max_len=3, p=1.0)]
    # last3 is the full state at T = 4 (a prefix that emits has at most 3 tokens)
    settings = [Setting("aliasing", feature=f) for f in ("last0", "last1", "last2", "last3")]
    settings += [Setting("hash", feature=f"hash{n}") for n in (4, 16)]
    settings += [Setting("horizon", max_len=t) for t in (2, 3, 5, 6)]
    settings += [Setting("horizon T=6", max_len=6, feature=f) for f in ("last0", "last2", "hash8")]
    settings += [Setting("gamma", gamma=g) for g in (0.5, 0.9)]
    settings += [Setting("p", p=p) for p in (0.5, 1.0)]
    settings += [Setting("language seed", seed=s) for s in (1, 2)]
    settings += [Setting("per-prefix teacher", language="toy", feature=f) for f in ("last1", "last2")]
    return settings


def build(setting: Setting):
    if setting.language == "topic":
        lang = make_topic_language(max_len=setting.max_len, seed=setting.seed)
    else:
        lang = make_toy_language(vocab_size=5, max_len=setting.max_len, seed=setting.seed)
    if setting.feature.startswith("last"):
        feat = last_k_features(lang, int(setting.feature[4:]))
    else:
        feat = hash_features(lang, int(setting.feature[4:]), seed=setting.seed)
    return make_aliased_problem(lang, feat, setting.p, setting.gamma)


def run_setting(setting: Setting) -> dict[str, dict]:
    """Solve every objective in ``setting``: name -> metrics (plus the solver's certificate)."""
    start = time.process_time()
    prob = build(setting)
    size = f"{prob.n_features} features, {prob.lang.n_states} prefixes"
    print(f"\n== {setting.group}: {setting.label} -- {size}", flush=True)
    print(f"{'objective':<15} " + " ".join(f"{c:>10}" for c in COLS) + f" {'pg':>8} {'iters':>5} {'residual':>8}")
    results = {}
    for name, solve in SOLVERS.items():
        sol = solve(prob)
        m = evaluate(prob, sol.theta_FV)
        m.update(pg=sol.pg, iters=sol.iters, residual=sol.residual)
        results[name] = m
        vals = " ".join(f"{m[c]:>10.4f}" for c in COLS)
        print(f"{name:<15} {vals} {sol.pg:>8.1e} {sol.iters:>5d} {sol.residual:>8.1e}", flush=True)
    print(verdict(results) + f" [{time.process_time() - start:.0f} s]")
    return results


def verdict(results: dict[str, dict]) -> str:
    """The winner on the on-policy reverse KL per sequence, its margin, and the TD objectives against BC/KD."""
    ranked = sorted(results, key=lambda n: results[n]["rev_kl_seq"])
    kl = {n: results[n]["rev_kl_seq"] for n in results}
    base = min(BASELINES, key=kl.get)
    fp = min(TD_FIXED_POINTS, key=kl.get)
    bd = min((n for n in TD_FIXED_POINTS if n.startswith("bd_")), key=kl.get)
    return (
        f"winner {ranked[0]} {kl[ranked[0]]:.4f} (runner-up {ranked[1]} +{kl[ranked[1]] - kl[ranked[0]]:.4f}); "
        f"soft_q {kl['soft_q'] - kl[base]:+.4f}, best TD fixed point {fp} {kl[fp] - kl[base]:+.4f}, "
        f"best BD {bd} {kl[bd] - kl[base]:+.4f} vs the better of BC/KD ({base} {kl[base]:.4f})"
    )


def summary(settings: list[Setting], all_results: list[dict[str, dict]]) -> None:
    """The summary as a markdown table: every objective's on-policy reverse KL per sequence in every setting."""
    names = list(SOLVERS)
    print("\n== summary: on-policy reverse KL per sequence (lower is better). Last columns: the best TD fixed point")
    print("(soft Q-learning or BD) and the best BD form, each minus the better of BC and KD (negative: it wins)")
    print("| setting | " + " | ".join(names) + " | winner | best TD fixed point | TD-BC | BD-BC |")
    print("|---" * (len(names) + 5) + "|")
    for setting, res in zip(settings, all_results):
        kl = {n: res[n]["rev_kl_seq"] for n in names}
        base = min(kl[b] for b in BASELINES)
        fp = min(TD_FIXED_POINTS, key=kl.get)
        bd = min(kl[n] for n in TD_FIXED_POINTS if n.startswith("bd_"))
        vals = " | ".join(f"{kl[n]:.4f}" for n in names)
        win = min(names, key=kl.get)
        print(f"| {setting.label} | {vals} | {win} | {fp} | {kl[fp] - base:+.4f} | {bd - base:+.4f} |")


def plot(settings: list[Setting], all_results: list[dict[str, dict]], out: str) -> None:
    """Panel 1: the per-token on-policy reverse KL against the horizon (last token, gamma 0.99, p 0.8). The other
    panels: the per-step reverse KL along the student's own trajectories at the longest horizon, one per feature."""
    longest = max(s.max_len for s in settings)
    panels = [(s, r) for s, r in zip(settings, all_results) if s.max_len == longest]
    horizon = sorted(
        ((s.max_len, r) for s, r in zip(settings, all_results) if s.label.startswith("topic0") and s.feature == "last1"
         and s.gamma == 0.99 and s.p == 0.8),
        key=lambda t: t[0],
    )
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5), sharey=False)
    axes = axes.ravel()
    kinds = {n: "TD" if n in TD_OBJECTIVES else ("imitation" if n in BASELINES else "on-policy") for n in SOLVERS}
    style = {"imitation": dict(ls="-", lw=2.2), "on-policy": dict(ls="--", lw=1.8), "TD": dict(ls=":", lw=1.8)}
    markers = dict(zip(SOLVERS, "os^vxDP*<>hd"))

    def draw(ax, xs, ys_by_name):
        for i, name in enumerate(SOLVERS):
            color = plt.cm.tab20(i)
            ax.plot(xs, ys_by_name[name], marker=markers[name], ms=5, color=color, label=name, **style[kinds[name]])
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))

    draw(axes[0], [t for t, _ in horizon], {n: [r[n]["rev_kl_tok"] for _, r in horizon] for n in SOLVERS})
    axes[0].set_title("topic0 last1 g=0.99 p=0.8: against the horizon", fontsize=10)
    axes[0].set_xlabel("horizon T (longest response, tokens)")
    axes[0].set_ylabel("on-policy reverse KL per token (nats, lower is better)")
    for ax, (setting, res) in zip(axes[1:], panels):
        draw(ax, range(1, longest + 1), {n: res[n]["step_kl"] for n in SOLVERS})
        ax.set_title(f"{setting.label}: per step", fontsize=10)
        ax.set_xlabel("step t of the response (the student's own trajectories)")
        ax.set_ylabel("on-policy reverse KL at step t (nats, lower is better)")
    for ax in axes[1 + len(panels) :]:
        ax.axis("off")
    handles, labels = axes[0].get_legend_handles_labels()
    axes[-1].legend(handles, labels, loc="center", fontsize=10, title="solid: BC/KD, dashed: on-policy, dotted: TD")
    fig.suptitle("Exact optima over aliased students: on-policy reverse KL (lower is better)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"\nwrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two small settings, no plot")
    ap.add_argument("--plot", default="docs/aliased_students.png", help="where the per-step plot goes")
    args = ap.parse_args()
    torch.set_num_threads(1)
    start = time.process_time()
    print("Exact optima over aliased students (lower is better except return_seq); lmbda 0.5 and beta 0.5 for GKD")
    print("and online BD; BD forms: math (vocab shift, alpha 0.1), fixed (set shift + CE, alpha 1), released (alpha")
    print("0.1, + CE); online BD: set shift, alpha 1, no CE; soft_q = the soft-optimal aliased policy;")
    print("soft_q_td(_online) = soft Q-learning's fixed point on the teacher data (and the student's own).")
    print("length = expected tokens;")
    print("off_data = fraction of the student's tokens at prefixes the teacher data never visit; pg = gradient-norm")
    print("certificate; iters, residual = turns of a fixed point's loop and its last policy change.")
    settings = sweep(args.quick)
    all_results = [run_setting(s) for s in settings]
    summary(settings, all_results)
    if not args.quick:
        plot(settings, all_results, args.plot)
    print(f"cpu time {time.process_time() - start:.0f} s")


if __name__ == "__main__":
    main()
