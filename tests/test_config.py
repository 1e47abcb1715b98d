"""Every YAML under experiments/conf composes against its structured schema; bad keys fail at compose time."""

from __future__ import annotations

import os

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from algorithms import REGISTRY, make_config
from tokenrl.config import register_configs

CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "conf")
register_configs()


def _options(group: str) -> list[str]:
    return sorted(f[:-5] for f in os.listdir(os.path.join(CONF, group)) if f.endswith(".yaml"))


def _compose(overrides: list[str]):
    with initialize_config_dir(version_base="1.3", config_dir=CONF):
        return compose(config_name="config", overrides=overrides)


def test_every_algorithm_has_a_yaml_and_back():
    assert set(_options("algo")) == set(REGISTRY)


@pytest.mark.parametrize("algo", _options("algo"))
def test_algo_yaml_composes_into_its_dataclass(algo):
    cfg = _compose([f"algo={algo}"])
    assert cfg.algo.name == algo
    algo_cfg = OmegaConf.to_container(cfg.algo, resolve=True)
    algo_cfg.pop("name")
    make_config(algo, algo_cfg)  # every YAML key is a field of the algorithm's config


@pytest.mark.parametrize("group", ["task", "model"])
def test_group_yamls_compose(group):
    for option in _options(group):
        cfg = _compose([f"{group}={option}"])
        assert OmegaConf.to_container(cfg, resolve=False)[group]


def test_unknown_algorithm_lists_valid_choices():
    with pytest.raises(ConfigCompositionException) as err:
        _compose(["algo=no_such_algo"])
    msg = str(err.value) + str(err.value.__cause__)
    assert "iql_bd" in msg and "bc" in msg


@pytest.mark.parametrize("override", ["algo.gama=0.9", "no_such_key=1", "task.n_train=3", "model.width=3"])
def test_unknown_key_fails_at_compose(override):
    with pytest.raises(ConfigCompositionException):
        _compose([override])


def test_wrong_type_fails_at_compose():
    with pytest.raises(ConfigCompositionException):
        _compose(["algo.gamma=not_a_number"])


def test_defaults_are_the_documented_main_job():
    cfg = _compose([])
    assert cfg.algo.name == "iql_bd" and cfg.task.name == "synthetic" and cfg.algo.top_p == 0.8
