"""TD-backup functions against slow per-token Python loops on random tensors with random lengths and flags."""

import copy
import math

import pytest
import torch

from tests.reference import scatter_mask, soft_value_dense
from tokenrl.core.backup import (
    chi2_penalty,
    chi2_phi,
    gather_action,
    implicit_reward,
    iq_learn_value_term,
    next_state_values,
    shifted_q,
    state_values,
    td_target,
)
from tokenrl.core.distributions import (
    kl,
    masked_max,
    masked_mean,
    project_to_set,
    restrict_to_set,
    soft_value,
    token_nll,
    vocab_logprobs,
)
from tokenrl.core.target import TargetNetwork

B, T, K, V = 6, 7, 5, 23


def gen(seed):
    return torch.Generator().manual_seed(seed)


def random_batch(seed):
    """Random lengths in [1, T] (one row at full length) and random terminated flags (both kinds present)."""
    g = gen(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    terminated = torch.rand(B, generator=g) < 0.5
    terminated[0], terminated[1] = True, False
    return lengths, terminated


def random_sets(seed, shape=(B, T + 1)):
    """Random candidate sets: distinct ids per state, a random number of valid leading slots (>= 1)."""
    g = gen(seed)
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(math.prod(shape))]).reshape(*shape, K)
    sizes = torch.randint(1, K + 1, shape, generator=g)
    mask = torch.arange(K) < sizes[..., None]
    return ids, mask


def loop_logsumexp(values, mask_row):
    vals = [float(v) for v, m in zip(values.tolist(), mask_row.tolist()) if m]
    if not vals:
        return -math.inf
    top = max(vals)
    return top + math.log(sum(math.exp(v - top) for v in vals))


# ------------------------------------------------------------------------------------------------
# Soft values and masks
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_soft_value_is_a_masked_logsumexp(seed):
    g = gen(seed)
    q = 3 * torch.randn(B, T + 1, K, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T + 1, K, generator=g) < 0.6
    mask[0, 0] = False  # an empty set
    v = soft_value(q, mask)
    assert v.shape == (B, T + 1)
    for b in range(B):
        for s in range(T + 1):
            expected = loop_logsumexp(q[b, s], mask[b, s])
            if expected == -math.inf:
                assert v[b, s].item() == -math.inf
            else:
                assert v[b, s].item() == pytest.approx(expected, abs=1e-12)


def test_soft_value_is_differentiable_only_through_the_set():
    q = torch.randn(4, K, requires_grad=True)
    mask = torch.tensor([[True, False, True, False, False]] * 4)
    soft_value(q, mask).sum().backward()
    assert bool((q.grad[:, ~mask[0]] == 0).all())
    # The gradient of a logsumexp is the softmax over the set.
    torch.testing.assert_close(q.grad[:, mask[0]], torch.softmax(q.detach()[:, mask[0]], -1))


@pytest.mark.parametrize("seed", [0, 1])
def test_scatter_mask_matches_loop(seed):
    ids, mask = random_sets(seed)
    dense = scatter_mask(ids, mask, V)
    assert dense.shape == (B, T + 1, V) and dense.dtype == torch.bool
    for b in range(B):
        for s in range(T + 1):
            expected = torch.zeros(V, dtype=torch.bool)
            for k in range(K):
                if mask[b, s, k]:
                    expected[ids[b, s, k]] = True
            assert torch.equal(dense[b, s], expected)


def test_scatter_mask_ignores_padding_slots():
    ids = torch.tensor([[3, 0, 0, 0]])  # token 3, then padding with pad_id 0
    mask = torch.tensor([[True, False, False, False]])
    assert scatter_mask(ids, mask, 5).tolist() == [[False, False, False, True, False]]


def test_scatter_mask_keeps_a_member_equal_to_pad_id():
    ids = torch.tensor([[0, 4, 0, 0]])  # real token 0 (= pad_id) in slot 0, padding repeats 0
    mask = torch.tensor([[True, True, False, False]])
    assert scatter_mask(ids, mask, 5).tolist() == [[True, False, False, False, True]]


def test_soft_value_dense_equals_gather_on_top_p_sets_containing_pad_id():
    """Realistic input: top-p sets from top_p_sparse (pad_id 0) where token 0 (EOS) is a likely token."""
    from tokenrl.core.top_p import top_p_sparse

    logits = torch.randn(4, V, generator=gen(40), dtype=torch.float64)
    logits[0, 0] = 5.0  # EOS in the (small) set of row 0, which is padded up to row 1's size
    logits[1] = 0.0  # flat row: a large set
    sets = top_p_sparse(logits, 0.8, pad_id=0)
    assert 0 in sets.ids[0][sets.mask[0]].tolist() and not bool(sets.mask[0].all())
    dense_v = soft_value_dense(logits, sets.ids, sets.mask)
    torch.testing.assert_close(dense_v, soft_value(logits.gather(-1, sets.ids), sets.mask))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_soft_value_dense_equals_sparse_gather(seed):
    ids, mask = random_sets(seed)
    logits = 2 * torch.randn(B, T + 1, V, generator=gen(seed + 10), dtype=torch.float64)
    dense_v = soft_value_dense(logits, ids, mask)
    sparse_v = soft_value(logits.gather(-1, ids), mask)
    torch.testing.assert_close(dense_v, sparse_v, rtol=0, atol=1e-12)
    for b in range(B):
        for s in range(T + 1):
            assert dense_v[b, s].item() == pytest.approx(loop_logsumexp(logits[b, s, ids[b, s]], mask[b, s]), abs=1e-12)


def test_soft_value_dense_with_full_vocabulary_is_logsumexp():
    logits = torch.randn(3, V, dtype=torch.float64)
    ids = torch.arange(V).expand(3, V)
    torch.testing.assert_close(soft_value_dense(logits, ids, torch.ones(3, V, dtype=torch.bool)), logits.logsumexp(-1))


def test_masked_max_matches_loop():
    g = gen(4)
    x = torch.randn(B, K, generator=g)
    mask = torch.rand(B, K, generator=g) < 0.5
    mask[0] = False
    out = masked_max(x, mask)
    for b in range(B):
        vals = [float(x[b, k]) for k in range(K) if mask[b, k]]
        assert out[b].item() == (max(vals) if vals else -math.inf)
    assert masked_max(x, mask, keepdim=True).shape == (B, 1)


@pytest.mark.parametrize("q_min", [None, -10.0, -1.0])
def test_shifted_q_matches_loop(q_min):
    g = gen(5)
    logits = 4 * torch.randn(B, T + 1, K, generator=g, dtype=torch.float64)
    _, mask = random_sets(5)
    q = shifted_q(logits, mask, q_min)
    assert q.shape == logits.shape
    for b in range(B):
        for s in range(T + 1):
            top = max(float(logits[b, s, k]) for k in range(K) if mask[b, s, k])
            for k in range(K):
                expected = float(logits[b, s, k]) - top
                if q_min is not None:
                    expected = max(expected, q_min)
                assert q[b, s, k].item() == pytest.approx(expected, abs=1e-12)
    # On the set, the max Q is 0, so V is in [0, log |set|].
    v = soft_value(q, mask)
    assert bool((v >= -1e-12).all()) and bool((v <= torch.log(mask.sum(-1).double()) + 1e-12).all())


def test_shifted_q_leaves_the_projected_policy_unchanged():
    logits = 3 * torch.randn(4, K, dtype=torch.float64)
    mask = torch.ones(4, K, dtype=torch.bool)
    q = shifted_q(logits, mask, None)
    torch.testing.assert_close(torch.softmax(q, -1), torch.softmax(logits, -1))


def test_shifted_q_empty_set_is_finite_and_keeps_gradients():
    logits = torch.randn(2, K, requires_grad=True)
    mask = torch.zeros(2, K, dtype=torch.bool)
    q = shifted_q(logits, mask, -10.0)
    assert bool(torch.isfinite(q).all())


def _valid(lengths_B, n_steps):
    return torch.arange(n_steps)[None, :] < lengths_B[:, None]


# ------------------------------------------------------------------------------------------------
# Next-state values, TD targets, rewards
# ------------------------------------------------------------------------------------------------
def loop_next_values(v_BS, lengths, terminated):
    out = torch.zeros(B, T, dtype=v_BS.dtype)
    for b in range(B):
        n = int(lengths[b])
        for t in range(T):
            if t >= n:
                out[b, t] = 0.0  # padding
            elif t + 1 == n and bool(terminated[b]):
                out[b, t] = 0.0  # V after EOS
            else:
                out[b, t] = v_BS[b, t + 1]  # includes the bootstrapped V(s_len) of truncated rows
    return out


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_next_state_values_match_loop(seed):
    lengths, terminated = random_batch(seed)
    v = torch.randn(B, T + 1, generator=gen(seed + 20), dtype=torch.float64) + 5.0  # nonzero everywhere
    v_next = next_state_values(v, lengths, terminated)
    assert v_next.shape == (B, T)
    torch.testing.assert_close(v_next, loop_next_values(v, lengths, terminated), rtol=0, atol=0)
    # Spot checks of the three cases.
    n0, n1 = int(lengths[0]), int(lengths[1])
    assert v_next[0, n0 - 1].item() == 0.0  # terminated row: 0 after the EOS
    assert v_next[1, n1 - 1].item() == v[1, n1].item()  # truncated row: bootstrapped


def test_next_state_values_gradient_skips_masked_states():
    lengths, terminated = random_batch(7)
    v = torch.randn(B, T + 1, requires_grad=True)
    next_state_values(v, lengths, terminated).sum().backward()
    for b in range(B):
        n = int(lengths[b])
        for s in range(T + 1):
            used = 1 <= s <= n and not (s == n and bool(terminated[b]))
            assert v.grad[b, s].item() == (1.0 if used else 0.0)


@pytest.mark.parametrize("gamma", [0.0, 0.9, 0.99, 1.0])
def test_td_target_and_implicit_reward_match_loop(gamma):
    lengths, terminated = random_batch(8)
    g = gen(8)
    r = torch.randn(B, T, generator=g, dtype=torch.float64)
    q = torch.randn(B, T, generator=g, dtype=torch.float64)
    v = torch.randn(B, T + 1, generator=g, dtype=torch.float64)
    v_next = next_state_values(v, lengths, terminated)
    y = td_target(r, v_next, gamma)
    ir = implicit_reward(q, v_next, gamma)
    ref_next = loop_next_values(v, lengths, terminated)
    for b in range(B):
        for t in range(T):
            assert y[b, t].item() == pytest.approx(r[b, t].item() + gamma * ref_next[b, t].item(), abs=1e-12)
            assert ir[b, t].item() == pytest.approx(q[b, t].item() - gamma * ref_next[b, t].item(), abs=1e-12)
    # The implicit reward inverts the backup: r = Q - gamma V'  <=>  Q = td_target(r, V').
    torch.testing.assert_close(td_target(ir, v_next, gamma), q)


@pytest.mark.parametrize("alpha", [0.1, 0.5, 2.0])
def test_chi2_phi_matches_formula(alpha):
    x = torch.linspace(-3, 3, 13, dtype=torch.float64)
    out = chi2_phi(x, alpha)
    for xi, oi in zip(x.tolist(), out.tolist()):
        assert oi == pytest.approx(xi - xi * xi / (4 * alpha), abs=1e-12)
    # Concave with its maximum alpha at x = 2 alpha.
    assert chi2_phi(torch.tensor(2 * alpha, dtype=torch.float64), alpha).item() == pytest.approx(alpha)
    assert bool((out <= alpha + 1e-12).all())


@pytest.mark.parametrize("alpha", [0.0, -0.1])
def test_chi2_phi_rejects_nonpositive_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        chi2_phi(torch.zeros(3), alpha)


@pytest.mark.parametrize("seed", [0, 1])
def test_masked_mean_matches_loop(seed):
    g = gen(seed)
    x = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) < 0.4
    vals = [float(x[b, t]) for b in range(B) for t in range(T) if mask[b, t]]
    assert masked_mean(x, mask).item() == pytest.approx(sum(vals) / len(vals), abs=1e-12)
    # Masked-out entries may be anything, even inf/nan-free garbage: they do not count.
    y = x.masked_fill(~mask, 1e6)
    assert masked_mean(y, mask).item() == pytest.approx(sum(vals) / len(vals), abs=1e-9)
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0


@pytest.mark.parametrize("gamma", [0.9, 0.99])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_iq_learn_value_term_matches_loop(gamma, seed):
    lengths, terminated = random_batch(seed)
    v = torch.randn(B, T + 1, generator=gen(seed + 30), dtype=torch.float64)
    v_next = next_state_values(v, lengths, terminated)
    mask = _valid(lengths, T)
    out = iq_learn_value_term(v, v_next, mask, gamma)
    ref_next = loop_next_values(v, lengths, terminated)
    terms = []
    for b in range(B):
        for t in range(int(lengths[b])):
            terms.append(v[b, t].item() - gamma * ref_next[b, t].item())
    assert out.dim() == 0
    assert out.item() == pytest.approx(sum(terms) / len(terms), abs=1e-12)


def test_iq_learn_value_term_telescopes_with_gamma_one():
    """With gamma = 1 and one row that terminates, the sum of V(s_t) - V(s_t+1) telescopes to V(s_0)."""
    v = torch.randn(1, T + 1, dtype=torch.float64)
    lengths, terminated = torch.tensor([T]), torch.tensor([True])
    v_next = next_state_values(v, lengths, terminated)
    out = iq_learn_value_term(v, v_next, _valid(lengths, T), 1.0)
    assert (out * T).item() == pytest.approx(v[0, 0].item(), abs=1e-12)


# ------------------------------------------------------------------------------------------------
# Polyak
# ------------------------------------------------------------------------------------------------
def make_nets(dtype=torch.float32):
    torch.manual_seed(0)
    online = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)).to(dtype)
    online(torch.randn(8, 4, dtype=dtype))  # moves the BatchNorm running stats (buffers)
    return online


@torch.no_grad()
def _hand_written_polyak(target: torch.nn.Module, online: torch.nn.Module, rate: float) -> None:
    """The target update tokenrl wrote by hand before it used torch.optim.swa_utils.AveragedModel."""
    for p_t, p_o in zip(target.parameters(), online.parameters()):
        p_t.lerp_(p_o.detach(), rate)
    for b_t, b_o in zip(target.buffers(), online.buffers()):
        b_t.copy_(b_o)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rate", [0.01, 0.5, 1.0])
def test_target_network_equals_the_hand_written_polyak_update(rate, dtype):
    """AveragedModel + get_ema_multi_avg_fn(1 - rate) gives the hand-written target after every one of n updates,
    the online network moving (and training its BatchNorm statistics) in between. The EMA's weight is
    ``1 - (1 - rate)``: bit-equal to ``rate`` in float32 (the parameters' dtype in training), equal to 1e-13
    relative in float64 (1 - (1 - 0.01) is 1 ulp above 0.01: 6e-15 relative after 100 updates)."""
    online = make_nets(dtype)
    target = TargetNetwork(online, rate)
    reference = copy.deepcopy(online)
    g = gen(1)
    for _ in range(12):
        with torch.no_grad():
            for p in online.parameters():
                p.add_(torch.randn(p.shape, generator=g, dtype=dtype))
        online(torch.randn(8, 4, generator=g, dtype=dtype))
        target.update()
        _hand_written_polyak(reference, online, rate)
        for got, want in zip(target.state_dict().values(), reference.state_dict().values()):
            if dtype == torch.float32:
                assert torch.equal(got, want)
            else:
                torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-15)
    assert all(not p.requires_grad for p in target.net.parameters())
    assert all(p.requires_grad and p.grad is None for p in online.parameters())  # untouched, no graph built


def test_target_network_copies_updates_and_round_trips():
    online = make_nets()
    target = TargetNetwork(online, 0.5)
    assert all(not p.requires_grad for p in target.net.parameters())
    for a, b in zip(target.state_dict().values(), online.state_dict().values()):
        assert torch.equal(a, b)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
    before = [p.detach().clone() for p in target.net.parameters()]
    target.update()
    for p_t, p_0, p_o in zip(target.net.parameters(), before, online.parameters()):
        torch.testing.assert_close(p_t, 0.5 * (p_0 + p_o))
    other = TargetNetwork(online, 0.5)
    other.load_state_dict(target.state_dict())
    for a, b in zip(other.net.parameters(), target.net.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="target_update_rate"):
        TargetNetwork(online, 0.0)


# ------------------------------------------------------------------------------------------------
# Policies on a set: gather, projection, NLL, KL
# ------------------------------------------------------------------------------------------------
def test_gather_action_matches_loop():
    g = gen(11)
    values = torch.randn(B, T + 1, K, generator=g, dtype=torch.float64)
    slot = torch.randint(-1, K, (B, T), generator=g)
    out = gather_action(values, slot)
    assert out.shape == (B, T)
    for b in range(B):
        for t in range(T):
            k = int(slot[b, t])
            assert out[b, t].item() == (values[b, t, k].item() if k >= 0 else 0.0)


def test_state_values_are_soft_values_and_zero_on_an_empty_set():
    g = gen(12)
    q = torch.randn(B, T + 1, K, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T + 1, K, generator=g) < 0.5
    mask[1, 2] = False
    v = state_values(q, mask)
    for b in range(B):
        for s in range(T + 1):
            expected = loop_logsumexp(q[b, s], mask[b, s])
            assert v[b, s].item() == pytest.approx(0.0 if expected == -math.inf else expected, abs=1e-12)
    assert soft_value(q, None).tolist() == torch.logsumexp(q, -1).tolist()


@pytest.mark.parametrize("log", [True, False])
def test_project_to_set_matches_loop(log):
    g = gen(13)
    logits = 2 * torch.randn(B, K, generator=g, dtype=torch.float64)
    mask = torch.rand(B, K, generator=g) < 0.6
    mask[0] = False  # an empty set: no NaN
    mask[1] = True
    out = project_to_set(logits, mask, log=log)
    for b in range(B):
        members = [k for k in range(K) if mask[b, k]]
        z = sum(math.exp(logits[b, k].item()) for k in members)
        for k in range(K):
            p = math.exp(logits[b, k].item()) / z if k in members else 0.0
            if log:
                assert out[b, k].item() == (pytest.approx(math.log(p), abs=1e-12) if p > 0 else -math.inf)
            else:
                assert out[b, k].item() == pytest.approx(p, abs=1e-12)
    torch.testing.assert_close(project_to_set(logits, None, log=log)[1], out[1])
    assert restrict_to_set(logits, mask)[~mask].eq(-math.inf).all()


def test_token_nll_and_vocab_logprobs_match_loop():
    g = gen(14)
    logits = torch.randn(3, 4, V, generator=g, dtype=torch.float64)
    actions = torch.randint(0, V, (3, 4), generator=g)
    ids = torch.randint(0, V, (3, 4, K), generator=g)
    nll, lp = token_nll(logits, actions), vocab_logprobs(logits, ids)
    for i in range(3):
        for j in range(4):
            lse = loop_logsumexp(logits[i, j], torch.ones(V, dtype=torch.bool))
            assert nll[i, j].item() == pytest.approx(lse - logits[i, j, int(actions[i, j])].item(), abs=1e-12)
            for k in range(K):
                assert lp[i, j, k].item() == pytest.approx(logits[i, j, int(ids[i, j, k])].item() - lse, abs=1e-12)


@pytest.mark.parametrize("with_mask", [True, False])
def test_kl_matches_loop_in_both_directions(with_mask):
    g = gen(15)
    mask = torch.rand(B, K, generator=g) < 0.7
    mask[:, 0] = True
    if not with_mask:
        mask[:] = True
        mask[0, 1] = False  # a zero-probability entry of both: 0 log 0 counts 0
    logp = project_to_set(torch.randn(B, K, generator=g, dtype=torch.float64), mask)
    logq = project_to_set(torch.randn(B, K, generator=g, dtype=torch.float64), mask)
    for first, second in ((logp, logq), (logq, logp)):
        out = kl(first, second, mask if with_mask else None)
        assert not torch.isnan(out).any()
        for b in range(B):
            expected = sum(
                math.exp(first[b, k].item()) * (first[b, k].item() - second[b, k].item())
                for k in range(K)
                if mask[b, k]
            )
            assert out[b].item() == pytest.approx(expected, abs=1e-12)
    assert bool((kl(logp, logq, mask) >= -1e-12).all())
    torch.testing.assert_close(kl(logp, logp, mask), torch.zeros(B, dtype=torch.float64))


def test_implicit_reward_broadcasts_over_candidates_and_chi2_penalty():
    g = gen(16)
    q_BTK = torch.randn(B, T, K, generator=g, dtype=torch.float64)
    v_next_BT = torch.randn(B, T, generator=g, dtype=torch.float64)
    r_BTK = implicit_reward(q_BTK, v_next_BT, 0.9)
    for k in range(K):
        torch.testing.assert_close(r_BTK[..., k], implicit_reward(q_BTK[..., k], v_next_BT, 0.9))
    sq = torch.tensor([0.0, 1.0, 4.0], dtype=torch.float64)
    assert chi2_penalty(sq, 0.5).tolist() == [0.0, 0.5, 2.0]
    with pytest.raises(ValueError, match="alpha"):
        chi2_penalty(sq, 0.0)
