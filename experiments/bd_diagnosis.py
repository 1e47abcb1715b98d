"""Exact (sampling-free) diagnosis of Bellman Distill on a toy token MDP: prints the table of docs/bd_diagnosis.md.

    python experiments/bd_diagnosis.py            # the full table (a few minutes on one core)
    python experiments/bd_diagnosis.py --quick    # p = 0.8, q_min = -10 only

Every BD row is the exact optimum of the data-weighted BD loss (tokenrl/theory/bd_tabular.py), solved in Q-space
(tokenrl/theory/bd_solvers.py) to a projected-gradient tolerance (column ``pg``) from the SFT start and from a
uniform start. Outside-set
columns use the *least* outside mass any optimum can have (pure BD fixes the logits on the set only).
``slope`` is d(out_mass)/d(step) along the negative BD gradient at the SFT start (positive = BD pushes
mass out of the set) and ``|g_out|`` the gradient norm on the outside logits there.
"""

from __future__ import annotations

import argparse
import itertools

import torch

from tokenrl.core.distributions import restrict_to_set
from tokenrl.theory.bd_solvers import completion, fit, out_mass_slope, solve_q
from tokenrl.theory.bd_tabular import BDOptions, make_problem, metrics, q_values, sft_start
from tokenrl.theory.toy_language import data_policy, make_toy_language

COLS = ("out_mass", "argmax_out", "kl_ts_set", "kl_st", "kl_ts", "entropy", "r_mean", "v_mean", "v_neg")


def fmt_row(label: str, extra: str, m: dict[str, float]) -> str:
    vals = " ".join(f"{m[c]:>9.3f}" if c in m else f"{'':>9}" for c in COLS)
    return f"{label:<44} {extra:<24} {vals}"


def header() -> str:
    return f"{'variant':<44} {'loss / pg / slope':<24} " + " ".join(f"{c:>9}" for c in COLS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="p = 0.8 and q_min = -10 only")
    ap.add_argument("--seed", type=int, default=0, help="seed of the toy language")
    args = ap.parse_args()
    torch.set_num_threads(1)

    lang = make_toy_language(seed=args.seed)
    prob = make_problem(lang)
    d = prob.w_SV.sum(-1)
    t_out = float((d * (prob.teacher_SV * ~prob.set_mask(0.8)).sum(-1)).sum())
    print(f"toy language: V={lang.vocab_size}, max_len={lang.max_len}, {int((d > 0).sum())} visited prefixes; "
          f"teacher mass outside its top-0.8 set {t_out:.3f}; data sampled at top-p 0.8; gamma 0.99, alpha 0.1")
    print(header())
    sft = sft_start(prob)
    uniform = torch.zeros_like(sft)
    data_logits = torch.log(torch.from_numpy(data_policy(prob.lang, 0.8)))
    print(fmt_row("BC = KD exact optimum (the data policy)", "", metrics(data_logits, prob)))
    for obj in ("bc", "kd"):
        f = fit(prob, obj, None, "uniform")
        print(fmt_row(f"{obj.upper()} trained from uniform (L-BFGS)", f"{f.loss:.4f} g={f.grad_norm:.0e}",
                      metrics(f.theta_SV, prob)))
    print(fmt_row("SFT start (data policy + 0.05 outside)", "", metrics(sft, prob)))

    ps = (0.8,) if args.quick else (0.5, 0.8, 1.0)
    clips = (-10.0,) if args.quick else (-10.0, None)
    pure = {}
    for form, p, shift, q_min in itertools.product(("math", "released"), ps, ("vocab", "set", "none"), clips):
        opts = BDOptions(p=p, form=form, shift=shift, q_min=q_min)
        slope, g_out = out_mass_slope(sft, prob, opts)
        for start, th0 in (("sft", sft), ("unif", uniform)):
            loss, q, pg = solve_q(prob, opts, q_values(th0, prob.set_mask(p), opts))
            m = metrics(completion(q, prob, opts), prob, opts, q_SV=q)
            pure[(form, p, shift, q_min, start)] = q
            extra = f"{loss:.4f} {pg:.0e}" + (f" {slope:+.3f}/{g_out:.2f}" if start == "sft" else "")
            print(fmt_row(f"BD {form} p={p} shift={shift} clip={q_min} {start}", extra, m), flush=True)

    print("-- BD + LM term (ce_coef = 1, as the default config), p = 0.8, q_min = -10, exact optimum")
    for form in ("math", "released"):
        for shift in ("vocab", "set"):
            opts = BDOptions(p=0.8, form=form, shift=shift, q_min=-10.0, ce_coef=1.0)
            best = None
            forced_choices = [None]
            if shift == "vocab":
                q_pure = pure[(form, 0.8, "vocab", -10.0, "sft")]
                forced_choices.append(restrict_to_set(q_pure, prob.set_mask(0.8)).amax(-1) < -1e-9)
            for forced in forced_choices:
                loss, q, pg = solve_q(prob, opts, q_values(sft, prob.set_mask(0.8), opts), forced_out_S=forced)
                if best is None or loss < best[0]:
                    best = (loss, q, pg, forced)
            loss, q, pg, forced = best
            theta = restrict_to_set(q, prob.set_mask(0.8))
            if forced is not None:
                theta[forced, (~prob.set_mask(0.8)).to(torch.int64).argmax(-1)[forced]] = 0.0
            print(fmt_row(f"BD+CE {form} shift={shift}", f"{loss:.4f} {pg:.0e}", metrics(theta, prob, opts, q_SV=q)))

    print("-- fix: shift=set (no vocabulary max) + set-mass term; alpha sweep (math form, p = 0.8, q_min = -10)")
    for alpha in (0.1, 1.0, 10.0):
        opts = BDOptions(p=0.8, shift="set", alpha=alpha)
        loss, q, pg = solve_q(prob, opts, q_values(sft, prob.set_mask(0.8), opts))
        m = metrics(completion(q, prob, opts, outside_mass="teacher"), prob, opts, q_SV=q)
        print(fmt_row(f"BD set + set-mass, alpha={alpha}", f"{loss:.4f} {pg:.0e}", m))
    for p in ps:
        opts = BDOptions(p=p, shift="set")
        loss, q, pg = solve_q(prob, opts, q_values(sft, prob.set_mask(p), opts))
        m = metrics(completion(q, prob, opts, outside_mass="teacher"), prob, opts, q_SV=q)
        print(fmt_row(f"BD set + set-mass, p={p}", f"{loss:.4f} {pg:.0e}", m))


if __name__ == "__main__":
    main()
