"""The algorithm zoo: one file per algorithm, registered by name.

    >>> from algorithms import make_algorithm, REGISTRY
    >>> algo = make_algorithm("iql_bd", policy, {"top_p": 0.8}, total_steps=1000)
    >>> stats = algo.update(batch)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from algorithms.base import AlgoConfig, Algorithm
from algorithms.bc import BC, BCConfig
from algorithms.gkd import GKD, GKDConfig
from algorithms.iql_bd import (
    BellmanDistill,
    BellmanDistillConfig,
    BellmanDistillKD,
    BellmanDistillKDConfig,
    BellmanDistillMath,
    BellmanDistillMathConfig,
    BellmanDistillReleased,
    BellmanDistillReleasedConfig,
)
from algorithms.kd import KD, KDConfig, KDProjectedBC, KDProjectedBCConfig
from algorithms.minillm import MiniLLM, MiniLLMConfig
from algorithms.soft_q import SoftQ, SoftQConfig


@dataclass(frozen=True)
class AlgoSpec:
    """A registry entry: the algorithm class and its config dataclass."""

    cls: type[Algorithm]
    config_cls: type[AlgoConfig]


REGISTRY: dict[str, AlgoSpec] = {}


def register(name: str, cls: type[Algorithm], config_cls: type[AlgoConfig]) -> None:
    """Add an algorithm under ``name`` (the name used by ``algo=<name>`` on the command line)."""
    if name in REGISTRY:
        raise ValueError(f"algorithm {name!r} is already registered")
    REGISTRY[name] = AlgoSpec(cls, config_cls)


def make_config(name: str, overrides: dict[str, Any] | None = None) -> AlgoConfig:
    """Build ``name``'s config from keyword overrides; unknown keys are an error listing the valid ones."""
    spec = get_spec(name)
    overrides = dict(overrides or {})
    overrides.pop("name", None)
    valid = {f.name for f in dataclasses.fields(spec.config_cls)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for algorithm {name!r}; valid options: {sorted(valid)}")
    return spec.config_cls(**overrides)


def get_spec(name: str) -> AlgoSpec:
    """Registry lookup with an error listing the registered names."""
    if name not in REGISTRY:
        raise KeyError(f"unknown algorithm {name!r}; registered: {sorted(REGISTRY)}")
    return REGISTRY[name]


def make_algorithm(name: str, policy, config: AlgoConfig | dict | None = None, total_steps: int = 1000) -> Algorithm:
    """Instantiate a registered algorithm on ``policy``."""
    spec = get_spec(name)
    if not isinstance(config, AlgoConfig):
        config = make_config(name, config)
    return spec.cls(policy, config, total_steps)


register("bc", BC, BCConfig)
register("kd", KD, KDConfig)
register("iql_bd", BellmanDistill, BellmanDistillConfig)
register("iql_bd_math", BellmanDistillMath, BellmanDistillMathConfig)
register("iql_bd_released", BellmanDistillReleased, BellmanDistillReleasedConfig)
register("soft_q", SoftQ, SoftQConfig)
register("gkd", GKD, GKDConfig)
register("minillm", MiniLLM, MiniLLMConfig)
register("bd_kd", BellmanDistillKD, BellmanDistillKDConfig)  # matched-information arms (issue 18)
register("kd_pbc", KDProjectedBC, KDProjectedBCConfig)

__all__ = ["AlgoConfig", "Algorithm", "AlgoSpec", "REGISTRY", "register", "make_config", "make_algorithm", "get_spec"]
