"""Every YAML under experiments/conf composes against its structured schema; bad keys fail at compose time."""

from __future__ import annotations

import os

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from algorithms import REGISTRY, make_config
from algorithms.iql_bd import BellmanDistillConfig
from tokenrl.run.config import RunConfig, make_run_config, register_configs
from tokenrl.tasks.hf import HFTaskConfig
from tokenrl.tasks.base import SyntheticTaskConfig

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


@pytest.mark.parametrize("group", ["task", "model", "selection"])
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


def test_run_config_from_compose_and_from_a_dict_agree():
    """Hydra and Python callers get the same typed config; missing keys take the schema defaults."""
    hydra_cfg = _compose(["algo=iql_bd", "steps=7", "task.samples_per_prompt=2"])
    composed = make_run_config(hydra_cfg)
    # Only what the YAMLs set away from the schema defaults (the default task and model YAMLs set none).
    algo = OmegaConf.to_container(hydra_cfg.algo)
    from_dict = make_run_config(
        {"algo": algo, "task": {"samples_per_prompt": 2}, "steps": 7, "sft_steps": 500, "data_dir": composed.data_dir}
    )
    assert isinstance(composed, RunConfig) and isinstance(composed.task, SyntheticTaskConfig)
    assert isinstance(composed.algo_config(), BellmanDistillConfig) and composed.algo_name == "iql_bd"
    assert composed == from_dict
    # The schema defaults hold wherever the run starts (no fallback elsewhere).
    assert (composed.task.data_seed, composed.task.cache_batch_size, composed.task.shard_prompts) == (1234, 64, 256)
    hf = make_run_config(_compose(["task=smollm2"]))
    assert isinstance(hf.task, HFTaskConfig) and hf.task.cache_batch_size == 8 and hf.task.samples_per_prompt == 1


@pytest.mark.parametrize(
    "cfg,error",
    [
        ({"algo": {"name": "bc", "lrr": 1.0}}, ConfigKeyError),
        ({"algo": {"name": "bc"}, "task": {"n_train": 3}}, ConfigKeyError),
        ({"algo": {"name": "bc"}, "task": {"kind": "hf", "n_train_prompts": 3}}, ConfigKeyError),
        ({"algo": {"name": "bc"}, "steps": "many"}, ValidationError),
        ({"algo": {"name": "bc"}, "task": {"kind": "other"}}, ValueError),
        ({"steps": 3}, ValueError),
    ],
)
def test_run_config_from_a_dict_rejects_unknown_keys_and_bad_values(cfg, error):
    with pytest.raises(error):
        make_run_config(cfg)
