"""top_p_mask / top_p_sparse / restrict_top_p against transformers' TopPLogitsWarper and per-row loops."""

import math

import pytest
import torch
from transformers.generation.logits_process import TopPLogitsWarper

from tokenrl.core.top_p import check_p, restrict_top_p, top_p_mask, top_p_sparse

V = 50


def warper_mask(logits_NV: torch.Tensor, p: float, min_keep: int = 1) -> torch.Tensor:
    """The oracle: the finite entries of TopPLogitsWarper's output, row by row of a 2-D tensor."""
    warper = TopPLogitsWarper(top_p=p, min_tokens_to_keep=min_keep)
    dummy_ids = torch.zeros(logits_NV.shape[0], 1, dtype=torch.long)
    return torch.isfinite(warper(dummy_ids, logits_NV.clone()))


def continuous_logits(seed: int, shape=(3, 5, V), scale: float = 2.0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g)).to(dtype)


def tied_logits(seed: int, shape=(3, 5, V)) -> torch.Tensor:
    """Logits from a small integer set, so most rows contain exact ties (also at the p boundary)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-2, 3, shape, generator=g).float()


def assert_matches_warper(logits: torch.Tensor, p: float, min_keep: int = 1) -> torch.Tensor:
    mask = top_p_mask(logits, p, min_keep)
    assert mask.shape == logits.shape and mask.dtype == torch.bool
    expected = warper_mask(logits.reshape(-1, logits.shape[-1]), p, min_keep).reshape(logits.shape)
    assert torch.equal(mask, expected), f"p={p}, min_keep={min_keep}: {(mask != expected).sum()} entries differ"
    return mask


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 0.8, 0.9, 0.95, 0.999])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mask_matches_warper_on_continuous_logits(p, seed):
    logits = continuous_logits(seed)
    mask = assert_matches_warper(logits, p)
    # Sanity of the rule itself: the kept set holds at least p of the mass (up to float rounding).
    probs = logits.softmax(-1)
    assert bool(((probs * mask).sum(-1) >= p - 1e-5).all())


@pytest.mark.parametrize("p", [0.2, 0.4, 0.5, 0.6, 0.8, 0.9])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_mask_matches_warper_with_exact_ties(p, seed):
    logits = tied_logits(seed)
    # The test only means something if ties really occur among the kept tokens.
    assert any(len(torch.unique(row)) < V for row in logits.reshape(-1, V))
    assert_matches_warper(logits, p)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_mask_matches_warper_in_other_dtypes(dtype):
    logits = continuous_logits(5, dtype=dtype)
    for p in (0.3, 0.8):
        assert_matches_warper(logits, p)


@pytest.mark.parametrize("min_keep", [2, 3, 7])
@pytest.mark.parametrize("p", [1e-6, 0.3, 0.8])
def test_mask_matches_warper_with_min_keep(min_keep, p):
    for logits in (continuous_logits(7), tied_logits(7)):
        mask = assert_matches_warper(logits, p, min_keep)
        assert bool((mask.sum(-1) >= min_keep).all())


def test_mask_leading_dims_are_rowwise():
    """Any leading shape gives the same answer as the rows taken one by one."""
    logits = continuous_logits(11, shape=(2, 3, 4, V))
    mask = top_p_mask(logits, 0.7)
    for idx in torch.cartesian_prod(torch.arange(2), torch.arange(3), torch.arange(4)).tolist():
        row = logits[tuple(idx)]
        assert torch.equal(mask[tuple(idx)], warper_mask(row[None], 0.7)[0])
    assert top_p_mask(logits[0, 0, 0], 0.7).shape == (V,)


def test_p_one_keeps_every_token_with_nonzero_probability():
    logits = continuous_logits(3)
    g = torch.Generator().manual_seed(3)
    banned = torch.rand(logits.shape, generator=g) < 0.3
    banned[..., 0] = False  # every row keeps at least one finite logit
    logits = logits.masked_fill(banned, float("-inf"))
    mask = assert_matches_warper(logits, 1.0)
    assert torch.equal(mask, ~banned)
    # Without -inf entries p = 1 keeps the whole vocabulary.
    assert bool(top_p_mask(continuous_logits(4), 1.0).all())


@pytest.mark.parametrize("min_keep", [1, 2, 4])
def test_tiny_p_keeps_exactly_the_top_min_keep_tokens(min_keep):
    logits = continuous_logits(9)
    mask = assert_matches_warper(logits, 1e-6, min_keep)
    top_ids = logits.topk(min_keep, dim=-1).indices
    expected = torch.zeros_like(mask).scatter(-1, top_ids, True)
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, float("nan"), "abc", None])
def test_bad_p_raises_value_error_naming_the_value(bad):
    with pytest.raises(ValueError, match="p") as err:
        top_p_mask(continuous_logits(0), bad)
    assert repr(bad) in str(err.value) or str(bad) in str(err.value)
    with pytest.raises(ValueError):
        check_p(bad)
    with pytest.raises(ValueError):
        top_p_sparse(continuous_logits(0), bad)
    with pytest.raises(ValueError):
        restrict_top_p(torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), bad)


def test_check_p_accepts_valid_numbers():
    assert check_p(1) == 1.0 and isinstance(check_p(1), float)
    assert check_p("0.5") == 0.5
    assert check_p(1e-9) == 1e-9


def test_bad_min_keep_and_scalar_logits_raise():
    with pytest.raises(ValueError, match="min_keep"):
        top_p_mask(continuous_logits(0), 0.5, min_keep=0)
    with pytest.raises(ValueError, match="dimension"):
        top_p_mask(torch.tensor(1.0), 0.5)


# ------------------------------------------------------------------------------------------------
# top_p_sparse
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [0.3, 0.8, 1.0])
@pytest.mark.parametrize("kind", ["continuous", "tied"])
def test_sparse_agrees_with_dense_mask_and_log_softmax(p, kind):
    logits = continuous_logits(21) if kind == "continuous" else tied_logits(21)
    pad_id = 7
    sets = top_p_sparse(logits, p, pad_id=pad_id)
    dense = top_p_mask(logits, p)
    sizes = dense.sum(-1)
    K = int(sizes.max())
    assert sets.ids.shape == sets.logprobs.shape == sets.mask.shape == (*logits.shape[:-1], K)
    assert sets.ids.dtype == torch.long and sets.mask.dtype == torch.bool
    assert torch.equal(sets.sizes, sizes)
    flat_logits = logits.reshape(-1, V)
    flat_ids, flat_lp, flat_mask = (x.reshape(-1, K) for x in (sets.ids, sets.logprobs, sets.mask))
    flat_dense = dense.reshape(-1, V)
    for r in range(flat_logits.shape[0]):
        n = int(flat_dense[r].sum())
        lsm = torch.log_softmax(flat_logits[r].float(), -1)
        # The first n slots are real, the rest padding.
        assert flat_mask[r].tolist() == [True] * n + [False] * (K - n)
        ids = flat_ids[r, :n]
        assert sorted(ids.tolist()) == flat_dense[r].nonzero().flatten().tolist()
        torch.testing.assert_close(flat_lp[r, :n], lsm[ids], rtol=0, atol=1e-6)
        # Descending probability.
        assert bool((flat_lp[r, :n][1:] <= flat_lp[r, :n][:-1]).all())
        # Padding slots.
        assert bool((flat_ids[r, n:] == pad_id).all())
        assert bool(torch.isneginf(flat_lp[r, n:]).all())


def test_sparse_min_keep_and_single_row():
    logits = continuous_logits(2, shape=(V,))
    sets = top_p_sparse(logits, 1e-6, min_keep=3)
    assert sets.ids.shape == (3,)
    assert sets.ids.tolist() == logits.topk(3).indices.tolist()


@pytest.mark.parametrize("max_k", [1, 2, 5])
def test_sparse_max_k_caps_the_set_to_its_most_likely_tokens(max_k):
    logits = continuous_logits(13, scale=0.5)  # flat distributions: large sets
    p = 0.9
    full = top_p_sparse(logits, p)
    assert int(full.sizes.max()) > max_k
    capped = top_p_sparse(logits, p, max_k=max_k)
    assert capped.ids.shape[-1] == max_k
    # The capped set is the prefix of the exact set (the max_k most likely tokens).
    n_full = full.sizes
    for idx in torch.cartesian_prod(torch.arange(3), torch.arange(5)).tolist():
        i = tuple(idx)
        n = min(int(n_full[i]), max_k)
        assert capped.mask[i].tolist() == [True] * n + [False] * (max_k - n)
        assert capped.ids[i][:n].tolist() == logits[i].topk(n).indices.tolist()
        torch.testing.assert_close(capped.logprobs[i][:n], full.logprobs[i][:n])
    with pytest.raises(ValueError, match="max_k"):
        top_p_sparse(logits, p, max_k=0)


def test_sparse_max_k_larger_than_sets_is_a_no_op():
    logits = continuous_logits(14)
    exact = top_p_sparse(logits, 0.5)
    capped = top_p_sparse(logits, 0.5, max_k=V)
    assert torch.equal(exact.mask, capped.mask) and torch.equal(exact.ids, capped.ids)


# ------------------------------------------------------------------------------------------------
# restrict_top_p
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [1e-6, 0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_restrict_cached_sets_equals_top_p_at_smaller_p(p, seed):
    logits = continuous_logits(100 + seed)
    cache = top_p_sparse(logits, 0.95)
    keep_K = restrict_top_p(cache.logprobs, cache.mask, p)
    assert keep_K.shape == cache.mask.shape
    assert not bool((keep_K & ~cache.mask).any())
    # Scatter the restricted slots back to the vocabulary and compare with the direct computation.
    # Dropped and padding slots go to an extra column V, so they never clear a kept token's entry.
    safe_ids = torch.where(keep_K, cache.ids, torch.full_like(cache.ids, V))
    dense = torch.zeros(*logits.shape[:-1], V + 1, dtype=torch.bool).scatter(-1, safe_ids, True)[..., :V]
    assert torch.equal(dense, top_p_mask(logits, p))


def test_restrict_is_a_prefix_and_keeps_the_first_token():
    logits = continuous_logits(31)
    cache = top_p_sparse(logits, 0.95)
    for p in (1e-9, 0.2, 0.6):
        keep = restrict_top_p(cache.logprobs, cache.mask, p)
        n = keep.sum(-1)
        assert bool((n >= 1).all())
        prefix = torch.arange(keep.shape[-1]) < n[..., None]
        assert torch.equal(keep, prefix)


def test_restrict_at_cache_p_keeps_the_cached_set():
    logits = continuous_logits(32)
    cache = top_p_sparse(logits, 0.8)
    assert torch.equal(restrict_top_p(cache.logprobs, cache.mask, 0.8), cache.mask)
    assert torch.equal(restrict_top_p(cache.logprobs, cache.mask, 1.0), cache.mask)


def test_restrict_accepts_float16_cached_logprobs():
    """The buffer stores log-probs in float16; restriction must still match up to that rounding."""
    logits = continuous_logits(33)
    cache = top_p_sparse(logits, 0.95)
    lp16 = cache.logprobs.half()
    keep = restrict_top_p(lp16, cache.mask, 0.5)
    keep32 = restrict_top_p(cache.logprobs, cache.mask, 0.5)
    # Only boundary tokens whose mass-before lies within float16 rounding of p may differ.
    probs = torch.exp(cache.logprobs.double()).masked_fill(~cache.mask, 0)
    before = probs.cumsum(-1) - probs
    near = (before - 0.5).abs() < 5e-3
    assert not bool(((keep != keep32) & ~near).any())
    assert math.isclose(float(keep.sum()), float(keep32.sum()), abs_tol=int(near.sum()))
