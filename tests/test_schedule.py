"""The learning-rate schedule of every algorithm against transformers' warm-up + cosine-to-a-floor schedule.

``algorithms.base.warmup_cosine`` is kept by hand for one difference, pinned here: transformers'
``get_cosine_with_min_lr_schedule_with_warmup`` warms up one step later (lr 0 at the first update); from the end
of the warm-up on the two give the same learning rate to the bit.
"""

from __future__ import annotations

import pytest
import torch
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from algorithms import make_algorithm
from tests.conftest import tiny_llama
from tokenrl.lm.policy import CausalLMPolicy


def _library_lrs(lr: float, warmup: int, total: int, min_ratio: float) -> list[float]:
    """transformers' learning rate before each of ``total`` updates and after the last one."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup, total, min_lr_rate=min_ratio)
    lrs = []
    for _ in range(total + 1):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("warmup, total, min_ratio", [(20, 200, 0.1), (0, 30, 0.0), (5, 5, 0.3), (3, 40, 1.0)])
def test_schedule_is_transformers_with_the_warm_up_one_step_earlier(warmup, total, min_ratio):
    lr = 3e-3
    policy = CausalLMPolicy(tiny_llama(), vocab_size=64)
    algo = make_algorithm("bc", policy, {"lr": lr, "warmup_steps": warmup, "min_lr_ratio": min_ratio}, total)
    ours = []
    for _ in range(total + 1):
        ours.append(algo.scheduler.get_last_lr()[0])  # the lr of the next update
        algo.optimizer.step()
        algo.scheduler.step()
    library = _library_lrs(lr, warmup, total, min_ratio)
    assert ours[warmup:] == library[warmup:]  # bit-equal from the end of the warm-up
    assert ours[:warmup] == library[1 : warmup + 1]  # the warm-up: transformers' one step later
    if warmup:
        assert library[0] == 0.0 and ours[0] == pytest.approx(lr / warmup)
    if total > warmup:
        assert ours[-1] == pytest.approx(lr * min_ratio)  # the floor, after the last update
