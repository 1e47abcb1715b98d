"""ReplayBuffer: collate against a per-trajectory loop, top-p restriction, persistence, validation, capacity,
and the online path (env rollout -> teacher cache -> buffer -> Batch)."""

import os

import numpy as np
import pytest
import torch

from envs.token_env import BatchedTokenGenerationEnv
from tokenrl.data.buffer import Batch, ReplayBuffer, TopPCache
from tokenrl.tasks.datagen import compute_top_p_cache
from tokenrl.tasks.synthetic import SyntheticLanguage, SyntheticLanguageConfig
from tokenrl.core.top_p import restrict_top_p, top_p_mask

P_CACHE = 0.95
PAD = 0


def make_data(lang, n, seed, p_cache=P_CACHE, max_new=10):
    """Teacher samples (some terminated, some truncated) plus uniformly random responses (actions that often
    fall outside the teacher's top-p set), their top-p caches, random rewards and mixed expert flags."""
    rng = np.random.default_rng(seed)
    prompts = lang.sample_prompts(n, rng)
    samples = lang.sample_continuations(prompts, max_new, rng)
    responses = [r for r, _ in samples]
    terminated = [t for _, t in samples]
    for i in range(0, n, 3):
        responses[i] = rng.integers(1, lang.vocab_size, size=int(rng.integers(1, max_new + 1))).tolist()
        terminated[i] = False
    caches = compute_top_p_cache(lang, prompts, responses, p_cache)
    rewards = [rng.normal(size=len(r)).astype(np.float32).tolist() for r in responses]
    is_expert = [bool(x) for x in rng.random(n) < 0.5]
    return dict(prompts=prompts, responses=responses, terminated=terminated, caches=caches, rewards=rewards,
                is_expert=is_expert)


def make_buffer(lang, n=24, seed=0, p_cache=P_CACHE, **kw):
    d = make_data(lang, n, seed, p_cache)
    buf = ReplayBuffer(pad_id=PAD, cache_top_p=p_cache, **kw)
    buf.add(d["prompts"], d["responses"], d["terminated"], caches=d["caches"], rewards=d["rewards"],
            is_expert=d["is_expert"])
    return buf, d


def reference_collate(buf, indices, p):
    """Slow reference: every Batch field built one trajectory, one column, one slot at a time."""
    B = len(indices)
    P = max(len(buf.prompts[i]) for i in indices)
    T = max(len(buf.responses[i]) for i in indices)
    S = T + 1
    K = max(int(buf.caches[i].sizes.max()) for i in indices)
    ref = {
        "input_ids": torch.full((B, P + T), buf.pad_id, dtype=torch.long),
        "attention": torch.zeros(B, P + T, dtype=torch.long),
        "positions": {},  # (b, column) -> position, real tokens only
        "actions": torch.full((B, T), buf.pad_id, dtype=torch.long),
        "action_mask": torch.zeros(B, T, dtype=torch.bool),
        "lengths": torch.zeros(B, dtype=torch.long),
        "rewards": torch.zeros(B, T),
        "cand_ids": torch.full((B, S, K), buf.pad_id, dtype=torch.long),
        "cand_lp": torch.full((B, S, K), float("-inf")),
        "cand_mask": torch.zeros(B, S, K, dtype=torch.bool),
        "state_mask": torch.zeros(B, S, dtype=torch.bool),
        "action_slot": torch.full((B, T), -1, dtype=torch.long),
        "action_lp": torch.full((B, T), float("-inf")),
    }
    for b, i in enumerate(indices):
        prompt, resp, cache = buf.prompts[i].tolist(), buf.responses[i].tolist(), buf.caches[i]
        pl, rl = len(prompt), len(resp)
        pos = 0
        for j, tok in enumerate(prompt):  # left-padded prompt
            col = P - pl + j
            ref["input_ids"][b, col] = tok
            ref["attention"][b, col] = 1
            ref["positions"][(b, col)] = pos
            pos += 1
        for t, tok in enumerate(resp):  # right-padded response
            ref["input_ids"][b, P + t] = tok
            ref["attention"][b, P + t] = 1
            ref["positions"][(b, P + t)] = pos
            pos += 1
            ref["actions"][b, t] = tok
            ref["action_mask"][b, t] = True
            ref["rewards"][b, t] = float(buf.rewards[i][t])
        ref["lengths"][b] = rl
        offset = 0
        for s in range(rl + 1):
            ref["state_mask"][b, s] = True
            n = int(cache.sizes[s])
            ids = cache.ids[offset : offset + n].tolist()
            lps = cache.logprobs[offset : offset + n].astype(np.float32).tolist()
            offset += n
            # The restricted set: the prefix whose mass strictly before each token is < p.
            mass_before, keep = 0.0, []
            for lp in cache.logprobs[offset - n : offset].astype(np.float64):
                keep.append(p >= buf.cache_top_p or not keep or mass_before < p)
                mass_before += float(np.exp(lp))
            for k in range(n):
                ref["cand_ids"][b, s, k] = ids[k]
                ref["cand_lp"][b, s, k] = lps[k]
                ref["cand_mask"][b, s, k] = keep[k]
            if s < rl:
                a = resp[s]
                if a in ids:
                    k = ids.index(a)
                    ref["action_lp"][b, s] = lps[k]  # from the stored, unrestricted cache
                    if keep[k]:
                        ref["action_slot"][b, s] = k
        assert offset == len(cache.ids)
    return ref


def assert_batch_matches_reference(batch: Batch, buf, indices, p):
    ref = reference_collate(buf, indices, p)
    B = len(indices)
    P = max(len(buf.prompts[i]) for i in indices)
    assert batch.prompt_width == P
    assert batch.top_p == p
    assert torch.equal(batch.input_ids_BL, ref["input_ids"])
    assert torch.equal(batch.attention_mask_BL, ref["attention"])
    for (b, col), pos in ref["positions"].items():
        assert batch.position_ids_BL[b, col].item() == pos
    assert batch.position_ids_BL.shape == batch.input_ids_BL.shape and int(batch.position_ids_BL.min()) >= 0
    assert torch.equal(batch.actions_BT, ref["actions"])
    assert torch.equal(batch.action_mask_BT, ref["action_mask"])
    assert torch.equal(batch.lengths_B, ref["lengths"])
    assert batch.terminated_B.tolist() == [buf.terminated[i] for i in indices]
    assert batch.truncated_B.tolist() == [buf.truncated[i] for i in indices]
    assert batch.is_expert_B.tolist() == [buf.is_expert[i] for i in indices]
    assert batch.terminated_B.dtype == batch.truncated_B.dtype == batch.is_expert_B.dtype == torch.bool
    assert torch.equal(batch.rewards_BT, ref["rewards"])
    assert torch.equal(batch.cand_ids_BSK, ref["cand_ids"])
    assert torch.equal(batch.cand_logprobs_BSK, ref["cand_lp"])
    assert torch.equal(batch.cand_mask_BSK, ref["cand_mask"])
    assert torch.equal(batch.state_mask_BS, ref["state_mask"])
    assert torch.equal(batch.action_slot_BT, ref["action_slot"])
    valid = ref["action_mask"]
    assert torch.equal(batch.action_logprob_BT[valid], ref["action_lp"][valid])
    assert batch.action_logprob_BT.shape == (B, valid.shape[1])
    # The Batch convention: response token t sits at column prompt_width + t.
    assert torch.equal(batch.input_ids_BL[:, P:], batch.actions_BT)
    return ref


# ------------------------------------------------------------------------------------------------
# collate
# ------------------------------------------------------------------------------------------------
def test_collate_matches_per_trajectory_loop(lang):
    buf, _ = make_buffer(lang)
    indices = [5, 0, 3, 3, 17, 9, 22, 1]
    batch = buf.collate(indices)
    ref = assert_batch_matches_reference(batch, buf, indices, P_CACHE)
    # The data exercise every branch: actions inside and outside the set, both kinds of ending.
    assert bool((ref["action_slot"][ref["action_mask"]] >= 0).any())
    assert bool((ref["action_slot"][ref["action_mask"]] == -1).any())
    assert any(buf.terminated[i] for i in indices) and any(buf.truncated[i] for i in indices)
    assert len({len(buf.prompts[i]) for i in indices}) > 1 and len({len(buf.responses[i]) for i in indices}) > 1


def test_collate_cache_values_are_the_teachers(lang):
    """The padded sets are the teacher's top-p sets at each state (ids exact, log-probs to float16)."""
    buf, _ = make_buffer(lang, n=6, seed=1)
    batch = buf.collate(list(range(6)))
    for b in range(6):
        prefix = buf.prompts[b].tolist()
        for s in range(int(batch.lengths_B[b]) + 1):
            tokens = torch.tensor([prefix + buf.responses[b][:s].tolist()])
            logits = lang.next_token_logits(tokens, torch.tensor([tokens.shape[1]]))[0]
            members = batch.cand_ids_BSK[b, s][batch.cand_mask_BSK[b, s]]
            assert sorted(members.tolist()) == top_p_mask(logits, P_CACHE).nonzero().flatten().tolist()
            torch.testing.assert_close(batch.cand_logprobs_BSK[b, s][batch.cand_mask_BSK[b, s]],
                                       torch.log_softmax(logits, -1)[members], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("p", [0.3, 0.5, 0.8])
def test_collate_restricted_to_smaller_p_matches_loop_and_restrict_top_p(lang, p):
    buf, _ = make_buffer(lang, seed=2)
    indices = list(range(0, 24, 2))
    batch = buf.collate(indices, top_p=p)
    assert_batch_matches_reference(batch, buf, indices, p)
    full = buf.collate(indices)
    expected = restrict_top_p(full.cand_logprobs_BSK, full.cand_mask_BSK, p)
    assert torch.equal(batch.cand_mask_BSK, expected)
    assert torch.equal(batch.cand_ids_BSK, full.cand_ids_BSK)
    assert torch.equal(batch.cand_logprobs_BSK, full.cand_logprobs_BSK)
    assert torch.equal(batch.action_logprob_BT, full.action_logprob_BT)
    assert int(batch.cand_mask_BSK.sum()) < int(full.cand_mask_BSK.sum())
    # Restriction only shrinks: an action inside the small set is inside the cached set at the same slot.
    inside = batch.action_slot_BT >= 0
    assert torch.equal(batch.action_slot_BT[inside], full.action_slot_BT[inside])


def test_collate_restriction_matches_the_teachers_smaller_top_p_set(lang):
    """Up to float16 rounding at a boundary, the restricted set is the teacher's own top-p set."""
    p = 0.5
    buf, _ = make_buffer(lang, n=8, seed=3)
    batch = buf.collate(list(range(8)), top_p=p)
    n_states, n_equal = 0, 0
    for b in range(8):
        prefix = buf.prompts[b].tolist()
        for s in range(int(batch.lengths_B[b]) + 1):
            tokens = torch.tensor([prefix + buf.responses[b][:s].tolist()])
            logits = lang.next_token_logits(tokens, torch.tensor([tokens.shape[1]]))[0]
            members = sorted(batch.cand_ids_BSK[b, s][batch.cand_mask_BSK[b, s]].tolist())
            n_equal += members == top_p_mask(logits, p).nonzero().flatten().tolist()
            n_states += 1
    assert n_equal >= 0.95 * n_states


def test_collate_larger_p_than_cache_raises_helpfully(lang):
    buf, _ = make_buffer(lang, n=4, p_cache=0.8)
    with pytest.raises(ValueError, match=r"p=0\.8.*p=0\.9|0\.9.*0\.8") as err:
        buf.collate([0, 1], top_p=0.9)
    msg = str(err.value)
    assert "cache" in msg and ("Regenerate" in msg or "regenerate" in msg)
    with pytest.raises(ValueError):
        buf.sample(2, torch.Generator().manual_seed(0), top_p=0.95)
    with pytest.raises(ValueError, match="p"):
        buf.collate([0], top_p=0.0)
    # p = 1.0 means "no restriction" and keeps the stored sets.
    assert torch.equal(buf.collate([0, 1], top_p=1.0).cand_mask_BSK, buf.collate([0, 1]).cand_mask_BSK)


def test_collate_without_cache(lang):
    buf = ReplayBuffer(pad_id=PAD)
    buf.add([[1, 2], [3]], [[4, 5, 0], [6]], [True, False])
    batch = buf.collate([0, 1])
    assert batch.cand_ids_BSK.shape == (2, 4, 1)
    assert not bool(batch.cand_mask_BSK.any())
    assert bool(torch.isneginf(batch.action_logprob_BT).all())
    assert bool((batch.action_slot_BT == -1).all())
    assert batch.input_ids_BL.tolist() == [[1, 2, 4, 5, 0], [0, 3, 6, 0, 0]]
    assert batch.rewards_BT.abs().sum().item() == 0.0


# ------------------------------------------------------------------------------------------------
# sample
# ------------------------------------------------------------------------------------------------
def batches_equal(a: Batch, b: Batch) -> bool:
    for name, x in vars(a).items():
        y = getattr(b, name)
        if torch.is_tensor(x):
            if x.shape != y.shape or not torch.equal(x, y):
                return False
        elif x != y:
            return False
    return True


def test_sample_is_deterministic_given_the_generator_seed(lang):
    buf, _ = make_buffer(lang)
    a = buf.sample(8, torch.Generator().manual_seed(123), top_p=0.8)
    b = buf.sample(8, torch.Generator().manual_seed(123), top_p=0.8)
    c = buf.sample(8, torch.Generator().manual_seed(124), top_p=0.8)
    assert batches_equal(a, b)
    assert not batches_equal(a, c)
    # It is collate of the drawn indices.
    idx = torch.randint(len(buf), (8,), generator=torch.Generator().manual_seed(123)).tolist()
    assert batches_equal(a, buf.collate(idx, top_p=0.8))


def test_sample_empty_buffer_raises():
    with pytest.raises(ValueError, match="empty"):
        ReplayBuffer().sample(2, torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------------------
# Persistence and memory
# ------------------------------------------------------------------------------------------------
def buffers_equal(a: ReplayBuffer, b: ReplayBuffer) -> None:
    assert len(a) == len(b)
    assert a.pad_id == b.pad_id and a.cache_top_p == b.cache_top_p
    for name in ("prompts", "responses", "rewards"):
        for x, y in zip(getattr(a, name), getattr(b, name)):
            assert np.array_equal(x, y) and x.dtype == y.dtype
    for name in ("terminated", "truncated", "is_expert"):
        assert getattr(a, name) == getattr(b, name)
    for x, y in zip(a.caches, b.caches):
        assert (x is None) == (y is None)
        if x is not None:
            for f in ("sizes", "ids", "logprobs"):
                assert np.array_equal(getattr(x, f), getattr(y, f))


def test_save_load_round_trip_is_exact_and_atomic(lang, tmp_path):
    buf, _ = make_buffer(lang, seed=4)
    buf.pad_id = 5
    path = str(tmp_path / "buf.safetensors")
    buf.save(path)
    assert os.listdir(tmp_path) == ["buf.safetensors"]  # no temporary file left behind
    loaded = ReplayBuffer.load(path)
    buffers_equal(buf, loaded)
    assert batches_equal(buf.collate([0, 4, 7], top_p=0.8), loaded.collate([0, 4, 7], top_p=0.8))
    # Without caches too.
    plain = ReplayBuffer(pad_id=1, cache_top_p=0.9)
    plain.add([[1, 2]], [[3, 0]], [True])
    plain.save(path)
    buffers_equal(plain, ReplayBuffer.load(path))
    assert os.listdir(tmp_path) == ["buf.safetensors"]


def test_failed_save_keeps_the_previous_file(lang, tmp_path, monkeypatch):
    """Atomicity: a crash while writing leaves the old file intact (write to a temp file, then rename)."""
    import tokenrl.data.buffer as buffer_mod

    buf, _ = make_buffer(lang, n=6, seed=5)
    path = str(tmp_path / "buf.safetensors")
    buf.save(path)
    before = open(path, "rb").read()

    def crashing_save_file(arrays, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise RuntimeError("disk full")

    monkeypatch.setattr(buffer_mod, "save_file", crashing_save_file)
    bigger, _ = make_buffer(lang, n=9, seed=6)
    with pytest.raises(RuntimeError, match="disk full"):
        bigger.save(path)
    assert open(path, "rb").read() == before
    buffers_equal(buf, ReplayBuffer.load(path))


def test_load_rejects_foreign_files(tmp_path):
    from safetensors.numpy import save_file

    path = str(tmp_path / "other.safetensors")
    save_file({"x": np.zeros(3, np.float32)}, path)
    with pytest.raises(ValueError, match="not a tokenrl replay-buffer"):
        ReplayBuffer.load(path)


def test_save_rejects_partial_caches(lang, tmp_path):
    buf, d = make_buffer(lang, n=3)
    buf.add([[1]], [[2]], [False])  # no cache
    with pytest.raises(ValueError, match="cache"):
        buf.save(str(tmp_path / "x.safetensors"))


def test_nothing_vocabulary_sized_is_stored(tmp_path):
    vocab = 50_000
    big = SyntheticLanguage(SyntheticLanguageConfig(vocab_size=vocab, n_topics=4, n_local_states=4))
    buf, _ = make_buffer(big, n=8, seed=7)
    bpt = buf.bytes_per_token()
    assert 0 < bpt < 200  # a few set members of 6 bytes each, versus 200 000 bytes for one float32 row
    assert bpt < vocab * 4 / 1000
    arrays = buf.prompts + buf.responses + buf.rewards
    arrays += [a for c in buf.caches for a in (c.sizes, c.ids, c.logprobs)]
    assert max(a.size for a in arrays) < vocab
    # nbytes counts what is held: the cache arrays alone already make bytes_per_token positive.
    cache_bytes = sum(c.sizes.nbytes + c.ids.nbytes + c.logprobs.nbytes for c in buf.caches)
    assert buf.nbytes() >= cache_bytes > 0
    path = str(tmp_path / "b.safetensors")
    buf.save(path)
    assert os.path.getsize(path) < 100 * buf.n_tokens + 10_000
    assert buf.set_sizes().shape == (buf.n_tokens + len(buf),)


# ------------------------------------------------------------------------------------------------
# add(): validation and capacity
# ------------------------------------------------------------------------------------------------
def cache_of(n_states):
    return TopPCache(sizes=np.ones(n_states, np.int32), ids=np.ones(n_states, np.int32),
                     logprobs=np.zeros(n_states, np.float16))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompts=[[]], responses=[[1]], terminated=[False]), "empty prompt"),
        (dict(prompts=[[1]], responses=[[]], terminated=[False]), "empty response"),
        (dict(prompts=[[1]], responses=[[2, 0]], terminated=[True], truncated=[True]), "both terminated and truncated"),
        (dict(prompts=[[1]], responses=[[2, 3]], terminated=[False], caches=[cache_of(2)]), "expected len"),
        (dict(prompts=[[1]], responses=[[2, 3]], terminated=[False], caches=[cache_of(4)]), "3"),
        (dict(prompts=[[1], [2]], responses=[[2]], terminated=[False]), "equal length"),
    ],
)
def test_add_validation(kwargs, match):
    buf = ReplayBuffer()
    with pytest.raises(ValueError, match=match):
        buf.add(**kwargs)


def test_add_defaults():
    buf = ReplayBuffer()
    buf.add([[1], [2]], [[3, 0], [4]], [True, False])
    assert buf.truncated == [False, True]
    assert buf.is_expert == [True, True]
    assert [r.tolist() for r in buf.rewards] == [[0.0, 0.0], [0.0]]
    assert buf.n_tokens == 3


def test_capacity_drops_oldest():
    buf = ReplayBuffer(capacity=3)
    buf.add([[1], [2]], [[11], [12]], [False, False])
    buf.add([[3], [4], [5]], [[13], [14], [15]], [False, False, True], rewards=[[1.0], [2.0], [3.0]])
    assert len(buf) == 3
    assert [p.tolist() for p in buf.prompts] == [[3], [4], [5]]
    assert [r.tolist() for r in buf.responses] == [[13], [14], [15]]
    assert [r.tolist() for r in buf.rewards] == [[1.0], [2.0], [3.0]]
    assert buf.terminated == [False, False, True] and len(buf.caches) == len(buf.is_expert) == 3
    buf.add([[6]], [[16]], [False])
    assert [p.tolist() for p in buf.prompts] == [[4], [5], [6]]


def test_capacity_holds_for_extend():
    buf = ReplayBuffer(capacity=2)
    other = ReplayBuffer()
    other.add([[1], [2], [3]], [[11], [12], [13]], [False] * 3)
    buf.extend(other)
    assert len(buf) == 2 and [p.tolist() for p in buf.prompts] == [[2], [3]]


def test_extend_checks_cache_p():
    a, b = ReplayBuffer(cache_top_p=0.8), ReplayBuffer(cache_top_p=0.9)
    b.add([[1]], [[2]], [False])
    with pytest.raises(ValueError, match="cache p"):
        a.extend(b)
    with pytest.raises(ValueError):
        ReplayBuffer(cache_top_p=1.5)


# ------------------------------------------------------------------------------------------------
# Online path: env rollout -> teacher top-p cache -> buffer -> Batch
# ------------------------------------------------------------------------------------------------
def test_online_rollouts_sample_into_sensible_batches(lang):
    max_new, p = 8, 0.8
    env = BatchedTokenGenerationEnv(lang.vocab_size, lang.eos_token_id, max_new, lang.config.prompt_len_max)
    prompts = lang.sample_prompts(16, np.random.default_rng(8))

    def noisy_policy(tokens_BT, lengths_B):  # the teacher, flattened: actions often leave its top-p set
        return 0.3 * lang.next_token_logits(tokens_BT, lengths_B)

    traj = env.rollout(noisy_policy, prompts, seed=8)
    caches = compute_top_p_cache(lang, traj.prompts, traj.responses, p)
    buf = ReplayBuffer(pad_id=env.pad_token_id, cache_top_p=p)
    buf.add(traj.prompts, traj.responses, traj.terminated, traj.truncated, caches=caches, rewards=traj.rewards,
            is_expert=False)
    assert len(buf) == 16 and buf.n_tokens == sum(len(r) for r in traj.responses)
    batch = buf.sample(32, torch.Generator().manual_seed(0))
    assert not bool(batch.is_expert_B.any())
    idx = torch.randint(16, (32,), generator=torch.Generator().manual_seed(0)).tolist()
    assert_batch_matches_reference(batch, buf, idx, p)
    assert bool((batch.terminated_B ^ batch.truncated_B).all())
    n_in, n_out = 0, 0
    for b, i in enumerate(idx):
        prompt, resp = traj.prompts[i], traj.responses[i]
        assert int(batch.lengths_B[b]) == len(resp)
        assert batch.terminated_B[b].item() == (resp[-1] == lang.eos_token_id)
        assert batch.truncated_B[b].item() == (resp[-1] != lang.eos_token_id and len(resp) == max_new)
        for t, a in enumerate(resp):
            logits = lang.next_token_logits(torch.tensor([prompt + resp[:t]]), torch.tensor([len(prompt) + t]))[0]
            inside = bool(top_p_mask(logits, p)[a])
            k = int(batch.action_slot_BT[b, t])
            assert (k >= 0) == inside
            if inside:
                assert batch.cand_ids_BSK[b, t, k].item() == a
                assert batch.action_logprob_BT[b, t].item() == pytest.approx(
                    torch.log_softmax(logits, -1)[a].item(), abs=2e-3)
                n_in += 1
            else:
                assert batch.action_logprob_BT[b, t].item() == float("-inf")
                n_out += 1
    assert n_in > 0 and n_out > 0


# ------------------------------------------------------------------------------------------------
# Padding and partially cached batches
# ------------------------------------------------------------------------------------------------
def tiny_cached_buffer():
    """Two trajectories whose top-p sets contain pad_id 0 (EOS), the second response longer."""
    buf = ReplayBuffer(pad_id=0, cache_top_p=0.9)
    c1 = TopPCache(np.array([1, 2], np.int32), np.array([5, 0, 7], np.int32), np.array([-0.1, -0.5, -1.0], np.float16))
    c2 = TopPCache(np.array([1, 1, 1], np.int32), np.array([5, 6, 7], np.int32), np.array([-0.1, -0.1, -0.1], np.float16))
    buf.add([[1], [2]], [[5], [6, 7]], [False, False], caches=[c1, c2])
    return buf


def test_action_logprob_is_minus_inf_on_padding():
    batch = tiny_cached_buffer().collate([0, 1])
    assert batch.action_mask_BT.tolist() == [[True, False], [True, True]]
    assert batch.action_slot_BT[0, 1].item() == -1
    assert batch.action_logprob_BT[0, 1].item() == float("-inf")


def test_partially_cached_batch_keeps_or_rejects():
    buf = tiny_cached_buffer()
    alone = buf.collate([1])
    buf.add([[3]], [[4]], [False])  # e.g. an online rollout added without a teacher cache
    try:
        mixed = buf.collate([1, 2])
    except ValueError:
        return
    assert torch.equal(mixed.cand_mask_BSK[0, :3, : alone.cand_mask_BSK.shape[-1]], alone.cand_mask_BSK[0])
    assert torch.equal(mixed.action_slot_BT[0], alone.action_slot_BT[0])
