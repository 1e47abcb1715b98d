"""The on-policy reverse-KL metric: against enumeration on a tiny token MDP, and on a transformers student."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import tiny_llama
from tests.tiny_token_mdp import TinyTokenMDP
from tokenrl.evaluation.teacher_forced import teacher_forced_kl, teacher_nll
from tokenrl.evaluation.onpolicy import on_policy_reverse_kl, on_policy_reverse_kl_of_model, student_token_logprobs


def test_estimate_matches_enumeration():
    """E[sum_t (log pi_s - log pi_t)] / E|y| = sequence-level KL / expected length, within the MC error."""
    mdp = TinyTokenMDP(vocab_size=4, max_len=3, seed=2)
    logits_SV = torch.randn(mdp.n_live, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    kl_seq, mean_len = mdp.sequence_reverse_kl(logits_SV)
    exact = (kl_seq / mean_len).item()

    n = 20000
    rows_BT, actions_BT, mask_BT = mdp.sample(logits_SV, n, torch.Generator().manual_seed(4))
    s_BT = torch.log_softmax(logits_SV, -1)[rows_BT, actions_BT]
    t_BT = mdp.teacher_logp_SV[rows_BT, actions_BT]
    estimate = on_policy_reverse_kl(s_BT, t_BT, mask_BT)
    # Delta-method standard error of a ratio of sample means: sd(X - R L) / (mean(L) sqrt(n)).
    x_B = ((s_BT - t_BT) * mask_BT).sum(-1)
    len_B = mask_BT.sum(-1).double()
    se = ((x_B - estimate * len_B).std() / (len_B.mean() * n**0.5)).item()
    assert se < 0.05 * abs(exact)
    assert abs(estimate - exact) < 4 * se


def test_empty_mask_is_nan():
    assert np.isnan(on_policy_reverse_kl(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool)))


def test_model_convenience_on_synthetic_teacher():
    """Sampled log-probs equal a direct forward; the exact-state form equals teacher_forced_kl on the samples."""
    from tokenrl.lm.sampling import sample_responses
    from tokenrl.tasks.synthetic import SyntheticLanguage

    lang = SyntheticLanguage()
    model = tiny_llama(vocab_size=lang.vocab_size)
    prompts = lang.sample_prompts(6, np.random.default_rng(0))
    metrics = on_policy_reverse_kl_of_model(model, lang, prompts, max_new_tokens=6, pad_token_id=0, seed=3, batch_size=4)
    responses = sample_responses(model, prompts, 6, lang.eos_token_id, 0, 3, batch_size=4)
    assert metrics["eval/onpolicy_kl_exact_state"] == pytest.approx(
        teacher_forced_kl(model, lang, prompts, responses, batch_size=4)["kl_student_teacher"]
    )
    s, mask = student_token_logprobs(model, prompts, responses, lang.eos_token_id, batch_size=4)
    t = torch.zeros_like(s)
    for i, nll in enumerate(teacher_nll(lang, prompts, responses)):
        t[i, : len(nll)] = -torch.from_numpy(nll)
    assert metrics["eval/onpolicy_kl"] == pytest.approx(on_policy_reverse_kl(s, t, mask))
    # Reference for one row: a forward on that row alone, read at the response positions.
    i = int(np.argmax([len(r) for r in responses]))
    ids = torch.tensor([prompts[i] + responses[i]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    p = len(prompts[i])
    want = [logp[p - 1 + k, responses[i][k]].item() for k in range(len(responses[i]))]
    assert s[i, : len(responses[i])].tolist() == pytest.approx(want, abs=1e-5)
    assert mask.sum().item() == sum(len(r) for r in responses)
