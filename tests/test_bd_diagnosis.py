"""The exact BD diagnosis: the weighted objective is the real loss, and the facts docs/bd_diagnosis.md states."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from algorithms.iql_bd import BDSteps, BellmanDistillConfig, bellman_distill_loss
from tokenrl.lm.policy import VocabStats
from tokenrl.theory.bd_solvers import completion, fit, solve_q
from tokenrl.theory.bd_tabular import BDOptions, Problem, bd_loss, make_problem, metrics, q_values, sft_start, soft_values
from tokenrl.theory.toy_language import action_sets, data_policy, make_toy_language, transition_weights

GAMMA = 0.99


@pytest.fixture(scope="module")
def lang():
    return make_toy_language(vocab_size=5, max_len=3, seed=0)


@pytest.fixture(scope="module")
def prob(lang):
    return make_problem(lang)


def enumerate_trajectories(lang, policy_SV):
    """Every response with non-zero probability: ``(tokens, states, terminated, prob)``."""
    out = []

    def walk(s, tokens, states, prob):
        for a in np.flatnonzero(policy_SV[s] > 0):
            pr = prob * policy_SV[s, a]
            if a == lang.eos_id:
                out.append((tokens + [a], states + [s], True, pr))
            elif lang.length_S[lang.child_SV[s, a]] == lang.max_len:
                out.append((tokens + [a], states + [s, lang.child_SV[s, a]], False, pr))
            else:
                walk(lang.child_SV[s, a], tokens + [a], states + [s], pr)

    walk(0, [], [], 1.0)
    return out


def test_transition_weights_are_expected_counts(lang):
    pi = data_policy(lang, 0.8)
    w = np.zeros_like(pi)
    for tokens, states, _, pr in enumerate_trajectories(lang, pi):
        for s, a in zip(states, tokens):
            w[s, a] += pr
    np.testing.assert_allclose(transition_weights(lang, 0.8), w / w.sum(), atol=1e-14)


def batch_loss(lang, theta_SV, trajs, mult, opts):
    """The real bellman_distill_loss on a batch holding each trajectory ``mult`` times (dense candidates, K = V)."""
    T = lang.max_len
    rows = [tr for tr, m in zip(trajs, mult) for _ in range(m)]
    B, V = len(rows), lang.vocab_size
    state_idx = torch.zeros(B, T + 1, dtype=torch.long)
    actions = torch.zeros(B, T, dtype=torch.long)
    lengths = torch.tensor([len(tr[0]) for tr in rows])
    terminated = torch.tensor([tr[2] for tr in rows])
    for b, (tokens, states, _, _) in enumerate(rows):
        state_idx[b, : len(states)] = torch.tensor(states)
        actions[b, : len(tokens)] = torch.tensor(tokens)
    t_S = torch.arange(T + 1)[None]
    set_SV = torch.from_numpy(action_sets(lang, opts.p))
    logits = theta_SV[state_idx]
    mask = set_SV[state_idx] & (t_S <= lengths[:, None])[..., None]
    action_mask = torch.arange(T)[None] < lengths[:, None]
    in_set = mask[:, :T].gather(-1, actions[..., None])[..., 0] & action_mask
    expert_idx = torch.where(in_set, actions, torch.full_like(actions, -1))
    # The tabular "none" shift (no shift) is the vocabulary shift by a zero max.
    vocab_max = {"vocab": logits.amax(-1), "set": None, "none": torch.zeros(B, T + 1, dtype=logits.dtype)}
    nll = -torch.log_softmax(logits[:, :T], -1).gather(-1, actions[..., None])[..., 0]
    released = opts.form != "math"
    cfg = BellmanDistillConfig(
        top_p=opts.p, gamma=opts.gamma, alpha=opts.alpha, q_min=opts.q_min, q_shift="set" if opts.shift == "set" else "vocab",
        chi2_on="vocab" if released else "expert", expert_term="vocab_mean" if released else "math",
        ce_coef=opts.ce_coef, mass_coef=opts.mass_coef,
    )
    loss, _ = bellman_distill_loss(
        cfg, logits, mask, BDSteps(expert_idx, action_mask, lengths, terminated), vocab_size=V,
        vocab=VocabStats(max_BS=vocab_max[opts.shift], lse_BS=torch.logsumexp(logits, -1), nll_BT=nll),
        teacher_logprobs_BSK=torch.from_numpy(np.log(lang.teacher_SV))[state_idx],
    )
    return loss


def repeated_trajectories(lang, seed):
    """The data policy's trajectories, each repeated 1-3 times at random, the :class:`Problem` weighted by those
    counts, and a random ``theta_SV``: ``(trajs, mult, prob, theta)``."""
    rng = np.random.default_rng(seed)
    trajs = enumerate_trajectories(lang, data_policy(lang, 0.8))
    mult = rng.integers(1, 4, size=len(trajs))
    w = np.zeros((lang.n_states, lang.vocab_size))
    for (tokens, states, _, _), m in zip(trajs, mult):
        for s, a in zip(states, tokens):
            w[s, a] += m
    prob = Problem(lang, torch.from_numpy(w / w.sum()))
    theta = torch.from_numpy(rng.normal(0.0, 2.0, (lang.n_states, lang.vocab_size)))
    return trajs, mult, prob, theta


def both_losses(lang, prob, trajs, mult, theta, opts):
    """bd_loss and the real batch loss at ``theta`` with their gradients: ``(ours, real, ours_grad, real_grad)``."""
    th1 = theta.clone().requires_grad_(True)
    th2 = theta.clone().requires_grad_(True)
    ours, real = bd_loss(th1, prob, opts), batch_loss(lang, th2, trajs, mult, opts)
    ours.backward()
    real.backward()
    return ours, real, th1.grad, th2.grad


def test_weighted_objective_is_the_real_loss(lang):
    """bd_loss with weights = trajectory multiplicities equals bellman_distill_loss on that batch, value and gradient."""
    trajs, mult, prob, theta = repeated_trajectories(lang, seed=1)
    grid = itertools.product(("math", "released"), (0.5, 0.8, 1.0), ("vocab", "set", "none"), (-10.0, None), (0.0, 1.0))
    for form, p, shift, q_min, ce in grid:
        opts = BDOptions(p=p, form=form, shift=shift, q_min=-1.5 if q_min else None, ce_coef=ce, gamma=GAMMA)
        ours, real, ours_grad, real_grad = both_losses(lang, prob, trajs, mult, theta, opts)
        assert torch.allclose(ours, real, atol=1e-12), (form, p, shift, q_min, ce, float(ours), float(real))
        assert torch.allclose(ours_grad, real_grad, atol=1e-12), (form, p, shift, q_min, ce)


def test_fixed_variant_objective_is_the_real_loss(lang):
    """The fix (set shift + set-mass term, with and without CE, alpha 0.1 and 1) as bellman_distill_loss computes it
    equals the tabular objective the diagnosis solved, value and gradient."""
    trajs, mult, prob, theta = repeated_trajectories(lang, seed=2)
    for p, ce, alpha in itertools.product((0.5, 0.8, 1.0), (0.0, 1.0), (0.1, 1.0)):
        opts = BDOptions(p=p, shift="set", q_min=-10.0, ce_coef=ce, mass_coef=1.0, alpha=alpha, gamma=GAMMA)
        ours, real, ours_grad, real_grad = both_losses(lang, prob, trajs, mult, theta, opts)
        assert torch.allclose(ours, real, atol=1e-12), (p, ce, alpha, float(ours), float(real))
        assert torch.allclose(ours_grad, real_grad, atol=1e-12), (p, ce, alpha)
        if p < 1:  # the mass term is present: the same loss without it differs
            assert not torch.allclose(bd_loss(theta, prob, BDOptions(**{**opts.__dict__, "mass_coef": 0.0})), ours)


def test_math_form_is_projected_bc_minus_reward_penalty(prob):
    """At p = sample_p the math form is exactly E_D[log pi_p(a|s)] - E_D[r^2] / (4 alpha)."""
    theta = torch.from_numpy(np.random.default_rng(2).normal(0, 2, tuple(prob.w_SV.shape)))
    for shift in ("vocab", "set", "none"):
        opts = BDOptions(p=0.8, shift=shift, q_min=None)
        set_SV = prob.set_mask(0.8)
        q = q_values(theta, set_SV, opts)
        v = soft_values(q, set_SV)
        v_next = torch.where(prob.child_SV >= 0, v[prob.child_SV.clamp_min(0)], torch.zeros(()).double())
        r = q - GAMMA * v_next
        w = prob.w_SV
        log_pi_p = q - v[:, None]
        expected = -((w * log_pi_p).sum() - (w * r.square()).sum() / (4 * opts.alpha))
        assert torch.allclose(bd_loss(theta, prob, opts), expected, atol=1e-12)


def test_bc_and_kd_reach_the_data_policy(prob):
    data = torch.from_numpy(data_policy(prob.lang, 0.8))
    d = prob.w_SV.sum(-1) > 0
    for obj in ("bc", "kd"):
        f = fit(prob, obj, None, "uniform")
        assert torch.allclose(torch.softmax(f.theta_SV, -1)[d], data[d], atol=1e-4), obj


@pytest.fixture(scope="module")
def vocab_optimum(prob):
    opts = BDOptions(p=0.8, shift="vocab")
    loss, q, pg = solve_q(prob, opts, q_values(sft_start(prob), prob.set_mask(0.8), opts))
    return opts, q, pg, metrics(completion(q, prob, opts), prob, opts, q_SV=q)


def test_vocab_max_shift_optimum_puts_the_argmax_outside_the_set(prob, vocab_optimum):
    """The issue's hypothesis, at the exact optimum: the max shift pins V_p's level, and the optimum frees it
    by putting an outside token on top, which leaves far more mass outside than the teacher (or BC: 0)."""
    opts, q, pg, m = vocab_optimum
    assert pg < 1e-5
    d = prob.w_SV.sum(-1)
    teacher_out = float((d * (prob.teacher_SV * ~prob.set_mask(0.8)).sum(-1)).sum())
    assert m["argmax_out"] > 0.25
    assert m["out_mass"] > 3 * teacher_out
    assert m["v_neg"] > 0  # V_p(s) < 0 is only reachable with the argmax outside the set
    assert m["r_mean"] < 2 * opts.alpha  # the chi^2 optimum r = 2 alpha is not what drives it


def test_set_shift_removes_the_incentive_and_fits_the_set_better(prob, vocab_optimum):
    m_vocab = vocab_optimum[3]
    opts = BDOptions(p=0.8, shift="set")
    _, q, pg = solve_q(prob, opts, q_values(sft_start(prob), prob.set_mask(0.8), opts))
    m = metrics(completion(q, prob, opts), prob, opts, q_SV=q)
    assert pg < 1e-5
    assert m["argmax_out"] == 0.0
    assert m["kl_ts_set"] < m_vocab["kl_ts_set"]
    # a larger alpha weakens the r^2 penalty: the in-set fit approaches BC's exact one (KL 0)
    opts10 = BDOptions(p=0.8, shift="set", alpha=10.0)
    _, q10, _ = solve_q(prob, opts10, q)
    assert metrics(completion(q10, prob, opts10), prob, opts10, q_SV=q10)["kl_ts_set"] < m["kl_ts_set"] / 5


def test_lm_term_does_not_remove_the_outside_argmax(prob, vocab_optimum):
    """BD + CE (weight 1): keeping the pure optimum's outside argmaxes still beats pinning the max in the set."""
    opts = BDOptions(p=0.8, shift="vocab", ce_coef=1.0)
    q0 = q_values(sft_start(prob), prob.set_mask(0.8), opts)
    forced = vocab_optimum[1].masked_fill(~prob.set_mask(0.8), float("-inf")).amax(-1) < -1e-9
    loss_out, _, _ = solve_q(prob, opts, q0, forced_out_S=forced)
    loss_in, _, _ = solve_q(prob, opts, q0)
    assert loss_out < loss_in - 1e-3


def test_fixed_variant_optimum(prob):
    """Set shift + set-mass term: the mass term is 0 at the set-shift optimum completed with the teacher's
    outside mass, so that is its exact optimum; it is closer to the teacher than BC's optimum (the data
    policy) on KL(student||teacher) and has a finite KL(teacher||student)."""
    opts = BDOptions(p=0.8, shift="set", mass_coef=1.0)
    _, q, _ = solve_q(prob, BDOptions(p=0.8, shift="set"), q_values(sft_start(prob), prob.set_mask(0.8), opts))
    theta = completion(q, prob, opts, outside_mass="teacher")
    pure = bd_loss(theta, prob, BDOptions(p=0.8, shift="set"))
    assert torch.allclose(bd_loss(theta, prob, opts), pure, atol=1e-12)  # the mass term vanishes
    m = metrics(theta, prob, opts, q_SV=q)
    d = prob.w_SV.sum(-1)
    teacher_out = float((d * (prob.teacher_SV * ~prob.set_mask(0.8)).sum(-1)).sum())
    assert abs(m["out_mass"] - teacher_out) < 1e-9 and m["argmax_out"] == 0.0
    bc = metrics(torch.log(torch.from_numpy(data_policy(prob.lang, 0.8))), prob)
    assert m["kl_st"] < bc["kl_st"] and np.isfinite(m["kl_ts"]) and not np.isfinite(bc["kl_ts"])
