"""The algorithm zoo: one file per algorithm, registered by name (:mod:`algorithms.registry`).

    >>> from algorithms import make_algorithm, REGISTRY
    >>> algo = make_algorithm("iql_bd", policy, {"top_p": 0.8}, total_steps=1000)
    >>> stats = algo.update(batch)

The zoo's own algorithms are registered here, in code, so that a checkout finds them whatever its installed
metadata says; other packages add theirs through the ``tokenrl.algorithms`` entry point group, loaded last.
Presets (``algo=iql_bd_math``) are not registered: they are YAMLs in ``experiments/conf/algo/``.
"""

from __future__ import annotations

from algorithms.base import AlgoConfig, Algorithm
from algorithms.bc import BC, BCConfig
from algorithms.gkd import GKD, GKDConfig
from algorithms.iql_bd import BellmanDistill, BellmanDistillConfig
from algorithms.iql_bd_online import OnlineBDConfig, OnlineBellmanDistill
from algorithms.kd import KD, KDConfig
from algorithms.minillm import MiniLLM, MiniLLMConfig
from algorithms.registry import (
    ENTRY_POINT_GROUP,
    REGISTRY,
    AlgoSpec,
    get_spec,
    load_plugins,
    make_algorithm,
    make_config,
    register,
    unknown_algorithm_message,
)
from algorithms.soft_q import SoftQ, SoftQConfig

register("bc", BC, BCConfig)
register("kd", KD, KDConfig)
register("iql_bd", BellmanDistill, BellmanDistillConfig)
register("soft_q", SoftQ, SoftQConfig)
register("gkd", GKD, GKDConfig)
register("minillm", MiniLLM, MiniLLMConfig)
register("iql_bd_online", OnlineBellmanDistill, OnlineBDConfig)
load_plugins()

__all__ = [
    "AlgoConfig",
    "Algorithm",
    "AlgoSpec",
    "ENTRY_POINT_GROUP",
    "REGISTRY",
    "register",
    "make_config",
    "make_algorithm",
    "get_spec",
    "unknown_algorithm_message",
]
