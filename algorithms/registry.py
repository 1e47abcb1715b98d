"""The algorithm registry: name -> (Algorithm class, config dataclass); plug-ins register through entry points.

The registry sits at the bottom of ``algorithms/`` (as Gymnasium's ``registration.py`` does for envs): it
imports no algorithm. ``algorithms/__init__.py`` registers the zoo's own algorithms, then every entry point
of the group ``tokenrl.algorithms`` of the installed packages, so a new algorithm needs a file and one line
of packaging, and no edit to this project:

.. code-block:: toml

    # pyproject.toml of your package; my_pkg/sqil.py defines SQIL(Algorithm) with config_class = SQILConfig
    [project.entry-points."tokenrl.algorithms"]
    sqil = "my_pkg.sqil:SQIL"

After ``pip install`` of that package, ``python experiments/run.py algo=sqil`` composes (the Hydra schema of
every registered name is generated: :func:`tokenrl.run.config.register_configs`) and runs.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from algorithms.base import AlgoConfig, Algorithm

ENTRY_POINT_GROUP = "tokenrl.algorithms"
"""The entry point group a package declares its algorithms in: ``<name> = "<module>:<Algorithm subclass>"``."""

HOW_TO_REGISTER = (
    f'To add an algorithm, declare it in your package\'s pyproject.toml under [project.entry-points."{ENTRY_POINT_GROUP}"] '
    'as <name> = "<module>:<Algorithm subclass with config_class>" and pip install the package '
    "(docs/new_algorithm.md); a preset of a registered algorithm is a YAML in experiments/conf/algo/."
)


@dataclass(frozen=True)
class AlgoSpec:
    """A registry entry: the algorithm class and its config dataclass."""

    cls: type[Algorithm]
    config_cls: type[AlgoConfig]


REGISTRY: dict[str, AlgoSpec] = {}

PLUGIN_ERRORS: dict[str, str] = {}
"""Entry points that failed to load: ``"<name> = <value>"`` -> the error (named again by :func:`get_spec`)."""


def register(name: str, cls: type[Algorithm], config_cls: type[AlgoConfig] | None = None) -> None:
    """Add an algorithm under ``name`` (the name used by ``algo=<name>`` on the command line).

    Args:
        name: the registry name.
        cls: the :class:`~algorithms.base.Algorithm` subclass.
        config_cls: its config dataclass; None = ``cls.config_class``.

    Raises:
        ValueError: ``name`` is taken, or no config dataclass is given or declared.
    """
    if name in REGISTRY:
        raise ValueError(f"algorithm {name!r} is already registered (by {REGISTRY[name].cls.__module__})")
    config_cls = config_cls or cls.config_class
    if config_cls is None or not issubclass(config_cls, AlgoConfig):
        raise ValueError(
            f"algorithm {name!r}: {cls.__name__} needs config_class = <an AlgoConfig subclass> (its config dataclass)"
        )
    REGISTRY[name] = AlgoSpec(cls, config_cls)


def load_plugins(group: str = ENTRY_POINT_GROUP) -> None:
    """Register every algorithm that an installed package declares in the entry point ``group``.

    A plug-in that fails to import, or is not an Algorithm subclass, is skipped with a warning (one broken
    package must not stop every run) and its error is repeated when its name is asked for.
    """
    for point in entry_points(group=group):
        try:
            cls = point.load()
            if not (isinstance(cls, type) and issubclass(cls, Algorithm)):
                raise TypeError(f"{point.value} is a {type(cls).__name__}, not an Algorithm subclass")
            register(point.name, cls)
        except Exception as error:  # noqa: BLE001  (any import error of a third-party package)
            PLUGIN_ERRORS[f"{point.name} = {point.value}"] = f"{type(error).__name__}: {error}"
            warnings.warn(f"{group} entry point {point.name} = {point.value} not registered: {error}", stacklevel=2)


def unknown_algorithm_message(name: str, presets: list[str] | tuple[str, ...] = ()) -> str:
    """Why ``name`` cannot be run: the registered names (and ``presets``), how to register, broken plug-ins."""
    known = f"registered: {sorted(REGISTRY)}" + (f"; presets: {sorted(presets)}" if presets else "")
    broken = "".join(f"; entry point {point} failed: {error}" for point, error in PLUGIN_ERRORS.items())
    return f"unknown algorithm {name!r}; {known}{broken}. {HOW_TO_REGISTER}"


def get_spec(name: str) -> AlgoSpec:
    """Registry lookup with an error listing the registered names and how to register one."""
    if name not in REGISTRY:
        raise KeyError(unknown_algorithm_message(name))
    return REGISTRY[name]


def make_config(name: str, overrides: dict[str, Any] | None = None) -> AlgoConfig:
    """Build ``name``'s config from keyword overrides; unknown keys are an error listing the valid ones."""
    spec = get_spec(name)
    overrides = dict(overrides or {})
    overrides.pop("name", None)
    overrides.pop("preset", None)
    valid = {f.name for f in dataclasses.fields(spec.config_cls)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for algorithm {name!r}; valid options: {sorted(valid)}")
    return spec.config_cls(**overrides)


def make_algorithm(name: str, policy, config: AlgoConfig | dict | None = None, total_steps: int = 1000) -> Algorithm:
    """Instantiate a registered algorithm on ``policy`` (its config is checked: :meth:`AlgoConfig.check`)."""
    spec = get_spec(name)
    if not isinstance(config, AlgoConfig):
        config = make_config(name, config)
    return spec.cls(policy, config, total_steps)
