"""Aliased tabular students: occupancies and metrics against enumerated responses, every objective's gradient
against finite differences, the solvers' optima and fixed points, and the pinned numbers of one small setting."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace
from functools import partial

import numpy as np
import pytest
import torch

from algorithms.gkd import generalized_jsd
from tokenrl.theory.aliased_objectives import (
    bc_loss, gkd_loss, jsd_rows, kd_loss, offline_bd_loss, online_bd_loss, reverse_kl_loss, soft_q_loss, soft_td_loss,
    soft_td_targets,
)
from tokenrl.theory.aliased_solvers import (
    BD_FORMS,
    ONLINE_BD,
    MAX_OUTER,
    OUTER_TOL_SMOOTHED,
    SOLVERS,
    gkd_step,
    online_bd_step,
    read_entries,
)
from tokenrl.theory.aliasing import (
    evaluate,
    hash_features,
    last_k_features,
    log_policy,
    make_aliased_problem,
    occupancy,
    prefix_tokens,
    projected_log_policy,
)
from tokenrl.theory.toy_language import make_topic_language, make_toy_language


def small_problem(k: int = 1, p: float = 0.8, gamma: float = 0.9, max_len: int = 3, features=None):
    lang = make_topic_language(vocab_size=4, max_len=max_len, n_topics=2, seed=0)
    feats = last_k_features(lang, k) if features is None else features(lang)
    return make_aliased_problem(lang, feats, p, gamma)


def random_theta(prob, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(0.0, 1.5, (prob.n_features, prob.lang.vocab_size)))


def responses(prob, log_pi_SV):
    """Every response with non-zero probability: ``(states, tokens, probability)`` (the slow reference)."""
    lang, out = prob.lang, []
    pi_SV = log_pi_SV.exp().numpy()

    def walk(s, states, tokens, pr):
        if lang.length_S[s] == lang.max_len:
            out.append((states, tokens, pr))
            return
        for a in np.flatnonzero(pi_SV[s] > 0):
            if a == lang.eos_id:
                out.append((states + [s], tokens + [a], pr * pi_SV[s, a]))
            else:
                walk(lang.child_SV[s, a], states + [s], tokens + [a], pr * pi_SV[s, a])

    walk(0, [], [], 1.0)
    return out


# ----------------------------------------------------------------------------------------------------------
# Languages and features
# ----------------------------------------------------------------------------------------------------------


def test_topic_language_depends_on_topic_and_last_token():
    lang = make_topic_language(vocab_size=5, max_len=4, n_topics=2, seed=1)
    np.testing.assert_allclose(lang.teacher_SV.sum(-1), 1.0, atol=1e-12)
    rows = {}
    for s, pre in enumerate(prefix_tokens(lang)):
        if pre:
            key = ((pre[0] - 1) % 2, pre[-1])
            rows.setdefault(key, lang.teacher_SV[s])
            np.testing.assert_array_equal(lang.teacher_SV[s], rows[key])
    # the topics' rows differ: a student that forgets the topic cannot represent the teacher
    assert any(np.abs(rows[(0, c)] - rows[(1, c)]).max() > 0.1 for c in range(1, 5))
    with pytest.raises(ValueError, match="n_topics"):
        make_topic_language(vocab_size=3, n_topics=2)


def test_features():
    lang = make_topic_language(vocab_size=4, max_len=3)
    pres = prefix_tokens(lang)
    assert pres[:4] == [(), (1,), (2,), (3,)] and len(pres) == lang.n_states
    assert last_k_features(lang, 0).max() == 0
    assert len(set(last_k_features(lang, 1))) == 1 + 3  # the empty prefix and one per last token
    assert len(set(last_k_features(lang, 3))) == lang.n_states  # the full state
    f2 = last_k_features(lang, 2)
    for s, t in itertools.combinations(range(lang.n_states), 2):
        assert (f2[s] == f2[t]) == (pres[s][-2:] == pres[t][-2:])
    assert set(hash_features(lang, 5)) <= set(range(5))
    with pytest.raises(ValueError, match="one non-negative index per prefix"):
        make_aliased_problem(lang, np.zeros(3, dtype=int), 0.8, 0.9)


# ----------------------------------------------------------------------------------------------------------
# Occupancy and metrics against enumerated responses
# ----------------------------------------------------------------------------------------------------------


def test_occupancy_and_metrics_match_enumerated_responses():
    prob = small_problem(k=1, max_len=3)
    theta = random_theta(prob, seed=3)
    theta[2, 1] = float("-inf")  # a token the student never emits
    log_pi = log_policy(prob, theta)
    rs = responses(prob, log_pi)
    assert math.isclose(sum(pr for *_, pr in rs), 1.0, abs_tol=1e-12)
    d = np.zeros(prob.lang.n_states)
    rev, ret, steps, alive = 0.0, 0.0, np.zeros(3), np.zeros(3)
    lt, lp = prob.log_teacher_SV.numpy(), log_pi.numpy()
    for states, tokens, pr in rs:
        for t, (s, a) in enumerate(zip(states, tokens)):
            d[s] += pr
            kl_s = sum(np.exp(lp[s, b]) * (lp[s, b] - lt[s, b]) for b in range(4) if lp[s, b] > -np.inf)
            steps[t] += pr * kl_s
            alive[t] += pr
        rev += pr * sum(lp[s, a] - lt[s, a] for s, a in zip(states, tokens))  # log p_theta(y) / p*(y)
        ret += pr * sum(lt[s, a] for s, a in zip(states, tokens))
    d_occ = (occupancy(prob, log_pi) * prob.live_S).numpy()
    np.testing.assert_allclose(d_occ, d, atol=1e-13)
    m = evaluate(prob, theta)
    assert m["rev_kl_seq"] == pytest.approx(rev, abs=1e-12)
    assert m["return_seq"] == pytest.approx(ret, abs=1e-12)
    assert m["length"] == pytest.approx(d.sum(), abs=1e-12)
    np.testing.assert_allclose(m["step_kl"], steps / alive, atol=1e-12)
    assert float(reverse_kl_loss(prob, theta)) == pytest.approx(rev, abs=1e-12)


def test_jsd_rows_is_gkds_loss():
    rng = np.random.default_rng(0)
    log_t = torch.log_softmax(torch.from_numpy(rng.normal(size=(7, 5))), -1)
    log_s = torch.log_softmax(torch.from_numpy(rng.normal(size=(7, 5))), -1)
    mask = torch.ones(7, 5, dtype=torch.bool)
    for beta in (0.0, 0.1, 0.5, 0.9, 1.0):
        expected = generalized_jsd(log_s, log_t, beta, mask)
        torch.testing.assert_close(jsd_rows(log_t, log_s, beta), expected, atol=1e-13, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# Gradients against finite differences
# ----------------------------------------------------------------------------------------------------------


def test_every_objective_gradient_matches_finite_differences():
    prob = small_problem(k=1, max_len=3, p=0.8)
    theta = random_theta(prob, seed=1).requires_grad_(True)
    read = read_entries(prob)
    all_read = torch.ones_like(read)
    reads = {False: read, True: all_read}  # under the vocabulary shift every logit enters the max
    weight_S = torch.from_numpy(np.random.default_rng(2).random(prob.lang.n_states))
    weight_SV = prob.w_SV * prob.set_SV
    target_SV = soft_td_targets(prob, random_theta(prob, seed=4))
    log_pi_p = projected_log_policy(prob, random_theta(prob, seed=5))
    mix_SV = 0.5 * prob.w_SV + 0.5 * (occupancy(prob, log_pi_p) * prob.live_S)[:, None] * log_pi_p.exp()
    v = torch.from_numpy(np.random.default_rng(6).normal(size=prob.n_features)).requires_grad_(True)
    online = replace(ONLINE_BD, gamma=0.9)
    objectives = {
        "bc": lambda th: bc_loss(prob, th),
        "kd": lambda th: kd_loss(prob, th),
        "reverse_kl": lambda th: reverse_kl_loss(prob, th),
        "soft_q": lambda th: soft_q_loss(prob, th),
        "gkd": lambda th: gkd_loss(prob, th, weight_S, 0.5),
        "soft_q_td": lambda th: soft_td_loss(prob, th, target_SV, weight_SV),
        "soft_q_td_target": lambda th: (soft_td_targets(prob, th) * weight_SV).sum(),
        **{
            name: partial(offline_bd_loss, prob, opts=replace(opts, gamma=0.9), read_FV=reads[opts.shift == "vocab"])
            for name, opts in BD_FORMS.items()
        },
        "bd_online": lambda th: online_bd_loss(prob, th, online, read, mix_SV),
    }
    for name, fn in objectives.items():
        assert torch.autograd.gradcheck(fn, (theta,), eps=1e-6, atol=1e-6, rtol=1e-5), name
    free = lambda th, vv: online_bd_loss(prob, th, online, read, mix_SV, vv)  # noqa: E731
    assert torch.autograd.gradcheck(free, (theta, v), eps=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Solvers: optima, fixed points, the pinned small setting
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def solved():
    """Every objective solved in the small aliased setting (last token, T = 3, p = 0.8, gamma 0.9)."""
    prob = small_problem(k=1, p=0.8, gamma=0.9)
    return prob, {name: solve(prob) for name, solve in SOLVERS.items()}


# rev_kl_seq of each objective's optimum in that setting (nats per response). The order is the finding of
# docs/aliased_students.md in small: the on-policy objectives first, the TD fixed points behind BC.
PINNED = {
    "bc": 0.60136186,
    "kd": 0.55362961,
    "reverse_kl": 0.22488383,
    "gkd": 0.48209646,
    "soft_q": 0.22599004,
    "soft_q_td": 0.85837256,
    "soft_q_td_online": 0.85837256,  # = offline here: on the data's support no feature mixes the two topics
    "bd_math": 1.40656439,
    "bd_fixed": 0.59536516,
    "bd_released": 0.81649201,
    "bd_online": 0.60120754,
    "bd_online_free": 0.65174851,
}


def test_pinned_small_setting(solved):
    prob, sols = solved
    got = {name: evaluate(prob, sol.theta_FV)["rev_kl_seq"] for name, sol in sols.items()}
    assert set(got) == set(PINNED)
    for name, value in PINNED.items():
        assert got[name] == pytest.approx(value, abs=2e-5), name


def test_reverse_kl_optimum_has_the_lowest_on_policy_reverse_kl(solved):
    """By construction, a check of the occupancy code: no other optimum does better on its own objective."""
    prob, sols = solved
    kl = {name: evaluate(prob, sol.theta_FV)["rev_kl_seq"] for name, sol in sols.items()}
    assert all(kl["reverse_kl"] <= v + 1e-9 for v in kl.values())
    # and aliasing bites: the best aliased student is far from the teacher, BC further still
    assert kl["reverse_kl"] > 0.1 and kl["bc"] > 2 * kl["reverse_kl"]


def test_certificates(solved):
    prob, sols = solved
    for name, sol in sols.items():
        assert sol.pg < 1e-5, name
        assert sol.iters < MAX_OUTER and sol.residual < OUTER_TOL_SMOOTHED, name


def test_soft_q_is_reverse_kl_at_gamma_one():
    prob = small_problem(k=1, gamma=1.0)
    theta = random_theta(prob, seed=7)
    assert float(soft_q_loss(prob, theta)) == pytest.approx(float(reverse_kl_loss(prob, theta)), abs=1e-13)
    prob9 = small_problem(k=1, gamma=0.9)
    assert float(soft_q_loss(prob9, theta)) < float(reverse_kl_loss(prob9, theta))


def test_closed_forms_are_stationary():
    prob = small_problem(k=1, p=1.0)  # at p = 1 BC's optimum is finite everywhere
    for name, loss in (("bc", bc_loss), ("kd", kd_loss)):
        theta = SOLVERS[name](prob).theta_FV.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss(prob, theta), [theta])
        assert float(grad.abs().max()) < 1e-12, name
        theta = theta.detach()
        assert float(loss(prob, theta)) < float(loss(prob, theta + 0.01 * random_theta(prob))), name


def test_full_state_student_recovers_the_teacher():
    """k = max_len: the student can represent the teacher. At p = 1 every non-BD objective's optimum is the
    teacher; BD's is not (its r^2 penalty biases even a tabular student: docs/bd_diagnosis.md)."""
    prob = small_problem(k=2, p=1.0, max_len=2)
    for name in ("bc", "kd", "reverse_kl", "gkd", "soft_q", "soft_q_td"):
        m = evaluate(prob, SOLVERS[name](prob).theta_FV)
        assert m["rev_kl_seq"] < 1e-8 and m["fwd_kl_tok"] < 1e-8, name
    assert evaluate(prob, SOLVERS["bd_fixed"](prob).theta_FV)["rev_kl_seq"] > 1e-3


def test_online_bd_without_own_data_is_offline_math_bd():
    prob = small_problem(k=1, p=0.8)
    theta = random_theta(prob, seed=8)
    data_SV = prob.d_data_S[:, None] * prob.log_data_SV.exp()
    for shift in ("vocab", "set", "none"):
        opts = replace(ONLINE_BD, shift=shift, gamma=0.9)
        read = torch.ones(prob.n_features, prob.lang.vocab_size, dtype=torch.bool)
        online = online_bd_loss(prob, theta, opts, read, data_SV)
        assert float(online) == pytest.approx(float(offline_bd_loss(prob, theta, opts, read)), abs=1e-12), shift


def test_bd_solutions_realise_their_loss_in_logit_space(solved):
    """The Q-space optima's completed logits (an outside token holding the max where the read Q are all < 0)
    give back the solver's loss when the exact loss reads them as logits."""
    prob, sols = solved
    read = read_entries(prob)
    for name, opts in BD_FORMS.items():
        o = replace(opts, p=prob.p, gamma=prob.gamma)
        loss = offline_bd_loss(prob, sols[name].theta_FV, o, torch.ones_like(read) if o.shift == "vocab" else read)
        assert float(loss) == pytest.approx(sols[name].loss, abs=1e-9), name


def test_fixed_points_are_fixed(solved):
    """GKD and online BD: one more turn of the data loop from the returned student barely moves its policy;
    offline soft Q-learning: Pi_D B_p Q = Q on the trained entries."""
    prob, sols = solved
    _, moved = gkd_step(prob, sols["gkd"].theta_FV)
    assert moved < 1e-6 and sols["gkd"].iters > 1
    for name in ("bd_online", "bd_online_free"):
        sol = sols[name]
        theta = torch.where(torch.isfinite(sol.theta_FV), sol.theta_FV, -1e3)  # the -inf completion is unread
        _, moved = online_bd_step(prob, theta, sol.value_F)
        assert moved < OUTER_TOL_SMOOTHED and sol.iters > 1, name
    q = sols["soft_q_td"].theta_FV
    weight = prob.w_SV * prob.set_SV
    target = soft_td_targets(prob, torch.where(torch.isfinite(q), q, -1e30))
    mass = prob.by_feature(weight)
    avg = prob.by_feature(torch.where(weight > 0, weight * target, 0.0)) / mass.clamp_min(1e-300)
    torch.testing.assert_close(avg[mass > 0], q[mass > 0], atol=1e-9, rtol=0)
