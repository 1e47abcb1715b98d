"""The import structure: no cycles, and no module imports from a layer above its own.

Layers, lowest first. A module may import modules of its own layer or of lower ones; every import counts,
including the lazy ones inside functions. A new module fails :func:`test_every_module_has_a_layer` until it
is placed here (a pattern ``pkg.*`` covers a package's modules).
"""

from __future__ import annotations

import ast
import fnmatch
import os

import pytest

LAYERS: list[tuple[str, list[str]]] = [
    # Pure functions on tensors, the top-p rule, the teacher protocol, padding, ranks, the divergence guard.
    ("core", ["tokenrl", "tokenrl.core", "tokenrl.core.*"]),
    # Exact tabular theory: operators, solvers, toy MDPs and toy languages, the exact BD diagnosis.
    ("theory", ["tokenrl.theory", "tokenrl.theory.*"]),
    # The replay buffer and its sparse top-p cache.
    ("data", ["tokenrl.data", "tokenrl.data.*"]),
    # Language models: adapters, the student's Q heads, the generation engine, memory-flat scoring.
    ("lm", ["tokenrl.lm", "tokenrl.lm.*"]),
    # Tasks: a teacher, prompts, references and samplers, and the offline teacher data they generate.
    ("tasks", ["tokenrl.tasks", "tokenrl.tasks.*"]),
    # Every metric of a student against its teacher.
    ("evaluation", ["tokenrl.evaluation", "tokenrl.evaluation.*"]),
    # Gymnasium environments and wrappers.
    ("envs", ["envs", "envs.*"]),
    # One file per algorithm and the registry.
    ("algorithms", ["algorithms", "algorithms.*"]),
    # The training run: config and its checks, trainer stages, checkpoints, selection, rollouts, distribution.
    ("run", ["tokenrl.run", "tokenrl.run.*"]),
    # Entry points.
    ("entry points", ["experiments.*", "benchmarks.*"]),
]
PACKAGES = ("tokenrl", "envs", "algorithms", "experiments", "benchmarks")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def module_files(root: str, packages: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """Module name -> file path of every ``.py`` under the ``packages`` folders of ``root``."""
    modules = {}
    for package in packages:
        for folder, _, files in os.walk(os.path.join(root, package)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    parts = os.path.relpath(path, root)[:-3].split(os.sep)
                    if parts[-1] == "__init__":
                        parts = parts[:-1]
                    modules[".".join(parts)] = path
    return modules


def import_graph(modules: dict[str, str]) -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its file (top level or inside functions).

    ``from pkg import name`` counts as an import of ``pkg.name`` when that is a module, else of ``pkg``.
    """
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        with open(path) as f:
            tree = ast.parse(f.read(), filename=path)
        is_package = path.endswith("__init__.py")
        targets: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = module.split(".") if is_package else module.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
            else:
                continue
            for name in names:
                # The longest project module that the dotted name starts with.
                while name and name not in modules:
                    name = name.rpartition(".")[0]
                if name and name != module:
                    targets.add(name)
        graph[module] = targets
    return graph


def layer_of(module: str) -> int | None:
    """Index of the module's layer in :data:`LAYERS` (None if it has none)."""
    for index, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(module, pattern) for pattern in patterns):
            return index
    return None


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Imports from a module to one in a higher layer, as readable lines."""
    found = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            low, high = layer_of(module), layer_of(target)
            if low is not None and high is not None and high > low:
                found.append(f"{module} ({LAYERS[low][0]}) imports {target} ({LAYERS[high][0]})")
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(module_files(ROOT))


def test_every_module_has_a_layer(graph):
    missing = sorted(m for m in graph if layer_of(m) is None)
    assert not missing, f"modules without a layer: {missing}; add them to LAYERS in {__file__}"


def test_no_import_cycle(graph):
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_upward_import(graph):
    assert upward_imports(graph) == []


def test_the_graph_sees_the_known_imports(graph):
    """The parser finds top-level, from-package and function-level imports (else the checks prove nothing)."""
    assert "tokenrl.run.config" in graph["tokenrl.run.trainer"]
    assert "algorithms" in graph["tokenrl.run.config"]  # from algorithms import REGISTRY (the package)
    assert "tokenrl.lm.sampling" in graph["tokenrl.lm.models"]
    assert "tokenrl.core.top_p" in graph["tokenrl.tasks.synthetic"]  # imported inside a method


def _write(root, files: dict[str, str]) -> dict[str, set[str]]:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return import_graph(module_files(str(root), ("tokenrl",)))


def test_checks_fail_on_an_added_cycle_and_upward_import(tmp_path):
    """A core module that lazily imports the trainer closes a cycle and goes up eight layers."""
    clean = {
        "tokenrl/__init__.py": "",
        "tokenrl/core/top_p.py": "import torch\n",
        "tokenrl/run/config.py": "from tokenrl.core.top_p import check_p\n",
        "tokenrl/run/trainer.py": "from tokenrl.run import config\nfrom ..core import top_p\n",
    }
    graph = _write(tmp_path, clean)
    assert graph["tokenrl.run.trainer"] == {"tokenrl.run.config", "tokenrl.core.top_p"}
    assert find_cycle(graph) is None and upward_imports(graph) == []

    graph = _write(tmp_path, {"tokenrl/core/top_p.py": "def f():\n    from tokenrl.run.trainer import run\n"})
    assert find_cycle(graph) in (
        ["tokenrl.core.top_p", "tokenrl.run.trainer", "tokenrl.core.top_p"],
        ["tokenrl.run.config", "tokenrl.core.top_p", "tokenrl.run.trainer", "tokenrl.run.config"],
    )
    assert upward_imports(graph) == ["tokenrl.core.top_p (core) imports tokenrl.run.trainer (run)"]
