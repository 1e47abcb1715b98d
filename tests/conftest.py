"""Shared fixtures: a small synthetic dataset with its top-p cache and a tiny transformers student."""

from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One intra-op thread: the models are tiny, and CI shares 2 cores between pytest and its subprocesses.
torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def tiny_llama(vocab_size: int = 64, seed: int = 0, dtype=torch.float32, **config):
    """A 1-layer Llama small enough for unit tests; ``config`` overrides any ``LlamaConfig`` field."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    fields = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        eos_token_id=0,
        pad_token_id=0,
        bos_token_id=None,
    )
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, **{**fields, **config})).to(dtype)


def load_experiment(name: str):
    """``experiments/<name>.py`` loaded as the module ``experiments_<name>`` (experiments/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"experiments_{name}", os.path.join(ROOT, "experiments", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while it executes.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def with_lm_batch(batch, algo, corpus, seed: int = 0):
    """``batch`` as the trainer hands it to ``algo``: with a pre-training batch of ``corpus`` (as many rows, at the
    algorithm's p) attached when the algorithm asks for one (``needs_lm_batch``), else unchanged."""
    import dataclasses

    if not algo.needs_lm_batch:
        return batch
    n = batch.actions_BT.shape[0]
    lm = corpus.sample(n, torch.Generator().manual_seed(10_000 + seed), top_p=algo.top_p)
    return dataclasses.replace(batch, lm_batch=lm)


CONF = os.path.join(ROOT, "experiments", "conf")


def algo_options(algo: str) -> dict:
    """The ``algo`` node of ``algo=<algo>`` (an algorithm or a preset YAML) as a dict, ``name`` and ``preset`` included."""
    from tokenrl.run.config import compose_algo

    return compose_algo(CONF, algo)


def make_preset(algo: str, policy, overrides: dict | None = None, total_steps: int = 1000):
    """The algorithm of ``algo=<algo>`` (a registered algorithm or a preset YAML) on ``policy``, with ``overrides``."""
    from algorithms import make_algorithm

    options = algo_options(algo)
    name = options.pop("name")
    options.pop("preset")
    return make_algorithm(name, policy, {**options, **(overrides or {})}, total_steps=total_steps)


LossAndGrads = tuple[torch.Tensor, list[torch.Tensor]]  # (detached loss, one gradient per parameter)


def backward_and_grads(loss: torch.Tensor, module: torch.nn.Module) -> LossAndGrads:
    """Backpropagates ``loss``; returns it detached and a copy of the gradient of every parameter of ``module``."""
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in module.parameters()]


def assert_same_loss_and_grads(a: LossAndGrads, b: LossAndGrads, loss_rtol: float, grad_rtol: float) -> None:
    """Two results of :func:`backward_and_grads` agree: the losses within ``loss_rtol``, each gradient within
    ``grad_rtol`` (absolute tolerance 1e-12 for both)."""
    torch.testing.assert_close(a[0], b[0], rtol=loss_rtol, atol=1e-12)
    for grad_a, grad_b in zip(a[1], b[1]):
        torch.testing.assert_close(grad_a, grad_b, rtol=grad_rtol, atol=1e-12)


@pytest.fixture(scope="module")
def lang():
    """The default synthetic language (the exact teacher of the default task)."""
    from tokenrl.tasks.synthetic import SyntheticLanguage

    return SyntheticLanguage()


@pytest.fixture(scope="session")
def synthetic_buffer():
    """60 teacher trajectories of the default synthetic language with a top-0.8 cache (some truncated)."""
    from tokenrl.data.buffer import ReplayBuffer
    from tokenrl.tasks.datagen import compute_top_p_cache
    from tokenrl.tasks.synthetic import SyntheticLanguage

    lang = SyntheticLanguage()
    rng = np.random.default_rng(0)
    prompts = lang.sample_prompts(60, rng)
    samples = lang.sample_continuations(prompts, 12, rng, top_p=0.8)
    responses = [r for r, _ in samples]
    terminated = [t for _, t in samples]
    caches = compute_top_p_cache(lang, prompts, responses, 0.8)
    buf = ReplayBuffer(pad_id=0, cache_top_p=0.8)
    buf.add(prompts, responses, terminated, caches=caches)
    assert 0 < sum(terminated) < len(terminated), "fixture should mix terminated and truncated responses"
    return buf


def edit_manifest(data_dir, **fields) -> None:
    """Overwrite ``fields`` in ``data_dir/manifest.json`` (a user editing the file by hand)."""
    import json

    path = os.path.join(str(data_dir), "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    manifest.update(fields)
    with open(path, "w") as f:
        json.dump(manifest, f)
