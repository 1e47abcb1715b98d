"""docs/new_algorithm.md runs as written: its python blocks define, register and train SQIL online.

The page's ```python blocks are executed in order in a fresh module. Then: the online rollouts reached the
buffer with caches, the doc's updates are finite and move the parameters, the loss falls on a fixed batch,
the shared algorithm contract passes, and the page's preset YAML composes against the generated schema.
Last, the page's algorithm file and ``pyproject.toml`` are built into a package in a temporary folder,
installed there without network, and run through ``experiments/run.py algo=sqil_doc`` by its entry point,
with no edit to this project.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import types

import pytest
import torch

import algorithms
import tests.test_algorithms as algorithm_tests
from tests.test_run_smoke import TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "new_algorithm.md")
NAME = "sqil_doc"


def _blocks(lang: str) -> list[str]:
    with open(DOC) as f:
        text = f.read()
    return re.findall(rf"^```{lang}\n(.*?)^```\s*$", text, flags=re.S | re.M)


def _exec(blocks: list[str], module_name: str, namespace: types.ModuleType | None = None) -> types.ModuleType:
    """Run ``blocks`` in order in ``namespace`` (a fresh module registered in sys.modules, as dataclasses need)."""
    module = namespace or types.ModuleType(module_name)
    sys.modules[module.__name__] = module
    for i, src in enumerate(blocks):
        exec(compile(src, f"{DOC}[python block {i}]", "exec"), module.__dict__)
    return module


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run ~50x faster on one intra-op thread than on two when the CPUs are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def doc():
    """The page executed once: algorithm block, setup block (parameters snapshotted), training loop."""
    blocks = _blocks("python")
    assert len(blocks) == 3, "the page should hold the algorithm, the setup and the loop as three python blocks"
    assert NAME not in algorithms.REGISTRY, "the doc example must not collide with a registered algorithm"
    try:
        ns = _exec(blocks[:2], "new_algorithm_doc")
        ns.params_before = [p.detach().clone() for p in ns.policy.parameters()]
        ns.n_before = len(ns.buffer)
        _exec(blocks[2:], "new_algorithm_doc", ns)
        yield ns
    finally:
        algorithms.REGISTRY.pop(NAME, None)
        sys.modules.pop("new_algorithm_doc", None)


def test_doc_registers_the_algorithm(doc):
    spec = algorithms.REGISTRY[NAME]
    assert spec.cls is doc.SQIL and spec.config_cls is doc.SQILConfig
    assert isinstance(doc.algo, doc.SQIL) and doc.algo.needs_rollouts
    cfg = algorithms.make_config(NAME, {"learner_weight": 0.5})
    assert cfg.learner_weight == 0.5 and cfg.top_p == 0.8
    with pytest.raises(ValueError, match="valid options"):
        algorithms.make_config(NAME, {"lernr_weight": 0.5})


def test_online_rollouts_reach_the_buffer_with_caches(doc):
    buf = doc.buffer
    learner = [i for i, e in enumerate(buf.is_expert) if not e]
    assert len(buf) == doc.n_before + doc.N_ROUNDS * doc.ROLLOUTS_PER_ROUND
    assert len(learner) == doc.N_ROUNDS * doc.ROLLOUTS_PER_ROUND and min(learner) == doc.n_before
    for i in learner:
        cache = buf.caches[i]
        assert cache is not None and len(cache.sizes) == len(buf.responses[i]) + 1
        assert buf.terminated[i] != buf.truncated[i]
    # Rollouts sampled inside the teacher's set at the cache p: every learner action has a Q.
    batch = buf.collate(learner, top_p=doc.algo.top_p)
    assert not batch.is_expert_B.any()
    assert bool((batch.action_slot_BT >= 0)[batch.action_mask_BT].all())


def test_doc_updates_are_finite_and_move_the_parameters(doc):
    assert len(doc.history) == doc.N_ROUNDS * doc.UPDATES_PER_ROUND
    for stats in doc.history:
        assert all(math.isfinite(v) for v in stats.values()), stats
        assert all("/" in k for k in stats)
    assert {"loss/total", "loss/td_teacher", "loss/td_learner", "optim/lr"} <= set(doc.history[-1])
    assert any(s["data/learner_frac"] > 0 and s["loss/td_learner"] > 0 for s in doc.history)
    changed = sum(not torch.equal(a, b) for a, b in zip(doc.params_before, doc.policy.parameters()))
    assert changed > 0


def test_loss_falls_on_a_fixed_mixed_batch(doc):
    buf, algo = doc.buffer, doc.algo
    teacher_rows = [i for i, e in enumerate(buf.is_expert) if e][:8]
    learner_rows = [i for i, e in enumerate(buf.is_expert) if not e][:8]
    batch = buf.collate(teacher_rows + learner_rows, top_p=algo.top_p)
    loss0, stats0 = algo.compute_loss(batch)
    assert stats0["data/learner_frac"] == pytest.approx(0.5)
    for _ in range(15):
        algo.update(batch)
    loss1, _ = algo.compute_loss(batch)
    assert loss1.item() < loss0.item()


def test_sqil_loss_rewards_teacher_one_and_learner_zero(doc):
    """The pure loss on hand-made tensors: targets 1 + gamma V' on teacher rows, gamma V' on learner rows."""
    q_BT = torch.tensor([[2.0, 1.0], [0.5, 0.0]], dtype=torch.float64)
    v_next_BT = torch.tensor([[1.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    in_set_BT = torch.tensor([[True, True], [True, False]])
    loss, stats = doc.sqil_loss(q_BT, v_next_BT, in_set_BT, torch.tensor([True, False]), 0.5, 2.0)
    teacher = ((2.0 - 1.5) ** 2 + (1.0 - 1.0) ** 2) / 2
    learner = (0.5 - 1.0) ** 2
    assert stats["loss/td_teacher"].item() == pytest.approx(teacher)
    assert stats["loss/td_learner"].item() == pytest.approx(learner)
    assert loss.item() == pytest.approx(teacher + 2.0 * learner)


def test_doc_algorithm_passes_the_shared_contract(doc, synthetic_buffer):
    algorithm_tests.test_contract(NAME, synthetic_buffer)


def test_doc_preset_composes_against_the_generated_schema(doc, tmp_path):
    from hydra.core.config_store import ConfigStore
    from hydra.errors import ConfigCompositionException

    from tokenrl.run.config import compose_config, make_run_config

    (yaml,) = _blocks("yaml")
    conf = tmp_path / "conf"
    shutil.copytree(os.path.join(ROOT, "experiments", "conf"), conf)
    (conf / "algo" / "sqil_half.yaml").write_text(yaml)
    try:
        cfg = compose_config(str(conf), ["algo=sqil_half"])
        assert cfg.algo.name == NAME and cfg.algo.preset == "sqil_half" and cfg.algo.learner_weight == 0.5
        run_cfg = make_run_config(cfg)
        assert run_cfg.algo_config() == doc.SQILConfig(learner_weight=0.5) and run_cfg.algo_preset == "sqil_half"
        plain = compose_config(str(conf), [f"algo={NAME}", "algo.learner_weight=0.25"])
        assert plain.algo.preset == NAME and plain.algo.learner_weight == 0.25
        with pytest.raises(ConfigCompositionException):
            compose_config(str(conf), [f"algo={NAME}", "algo.lernr_weight=0.5"])
    finally:
        for group in (ConfigStore.instance().repo["algo"], ConfigStore.instance().repo["schema"]["algo"]):
            group.pop(f"{NAME}.yaml", None)


def test_importing_the_algorithm_file_registers_nothing(doc):
    """The file is what an entry point loads: importing it (twice, as a notebook would) has no side effect."""
    (algo_block,) = _blocks("python")[:1]
    before = dict(algorithms.REGISTRY)
    try:
        first = _exec([algo_block], "new_algorithm_doc_again")
        again = _exec([algo_block], "new_algorithm_doc_again_2")
        assert algorithms.REGISTRY == before and first.SQIL is not again.SQIL is not doc.SQIL
        assert again.SQIL.config_class is again.SQILConfig
    finally:
        sys.modules.pop("new_algorithm_doc_again", None)
        sys.modules.pop("new_algorithm_doc_again_2", None)


def test_doc_algorithm_as_an_installed_package_runs_through_run_py(tmp_path):
    """The page's file plus its pyproject.toml, pip-installed into a folder of their own, run by name alone."""
    (toml,) = _blocks("toml")
    package = tmp_path / "package"
    package.mkdir()
    (package / "sqil_doc.py").write_text(_blocks("python")[0])
    (package / "pyproject.toml").write_text(toml)
    site = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index"]
    proc = subprocess.run([*pip, "--target", str(site), str(package)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (dist,) = site.glob("sqil_doc-*.dist-info")
    assert 'sqil_doc = sqil_doc:SQIL' in (dist / "entry_points.txt").read_text()

    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(site), TOKENRL_DATA_DIR=str(tmp_path / "data"), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "run.py"), *TINY, f"algo={NAME}", "algo.learner_weight=0.5",
           "sft_steps=0", "init_eval=false", "teacher_eval=false", f"hydra.run.dir={out}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["algo"] == NAME and metrics["config"]["algo"]["learner_weight"] == 0.5
    assert metrics["train"]["steps"] == 4 and "loss/td_learner" in metrics["train"]["last_stats"]
    assert metrics["rollouts"]["rollout/trajectories"] > 0  # it learned from its own rollouts (needs_rollouts)
