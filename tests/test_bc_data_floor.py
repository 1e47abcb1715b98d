"""experiments/bc_data_floor.py: the tabular floor of BC against a per-visit loop, and its behaviour in the data."""

import math
from collections import Counter

import numpy as np
import pytest

from tests.conftest import load_experiment
from tokenrl.tasks.synthetic import SyntheticLanguage, SyntheticLanguageConfig

floor = load_experiment("bc_data_floor")
CFG = SyntheticLanguageConfig(vocab_size=12, n_topics=2, n_local_states=3, mean_support=4.0, max_support=8, seed=1)


def _data(lang, n, seed, top_p):
    rng = np.random.default_rng(seed)
    prompts = lang.sample_prompts(n, rng)
    responses = [r for r, _ in lang.sample_continuations(prompts, 6, rng, top_p=top_p)]
    return [np.asarray(p) for p in prompts], [np.asarray(r) for r in responses]


def _slow_floor(lang, prompts, responses, top_p, lam):
    """Walk every trajectory token by token, count (state, action), then the visit-weighted KL by plain loops."""
    counts, visits = Counter(), Counter()
    for prompt, response in zip(prompts, responses):
        s = lang.start_state
        for tok in prompt:
            s = int(lang.next_state_SV[s, tok])
        for tok in response:
            counts[s, int(tok)] += 1
            visits[s] += 1
            s = int(lang.next_state_SV[s, tok])
    total, V = sum(visits.values()), lang.vocab_size
    out = 0.0
    for s, n_s in visits.items():
        probs = np.exp(lang.log_emission_SV[s])
        members, mass = [], 0.0
        for a in sorted(range(V), key=lambda a: -probs[a]):  # the top-p set, most likely first
            members.append(a)
            mass += probs[a]
            if mass >= top_p:
                break
        kl = 0.0
        for a in members:
            t = probs[a] / sum(probs[b] for b in members)
            kl += t * math.log(t / ((counts[s, a] + lam) / (n_s + lam * V)))
        out += n_s / total * kl
    return out


@pytest.mark.parametrize("top_p", [0.8, 1.0])
def test_floor_matches_a_per_visit_loop(top_p):
    lang = SyntheticLanguage(CFG)
    prompts, responses = _data(lang, 40, seed=0, top_p=top_p)
    got = floor.tabular_floor(lang, prompts, responses, top_p, lams=(0.01, 0.5))
    for lam in (0.01, 0.5):
        assert got[lam] == pytest.approx(_slow_floor(lang, prompts, responses, top_p, lam), rel=1e-9)


def test_floor_falls_with_more_data():
    lang = SyntheticLanguage(CFG)
    small = floor.tabular_floor(lang, *_data(lang, 30, seed=1, top_p=0.8), 0.8, lams=(0.01,))[0.01]
    large = floor.tabular_floor(lang, *_data(lang, 3000, seed=1, top_p=0.8), 0.8, lams=(0.01,))[0.01]
    assert large < small / 4
    assert large < 0.05
