"""Every YAML under experiments/conf composes against its structured schema; bad keys fail at compose time;
every registered algorithm composes with no YAML and a preset YAML lists only what differs from its schema."""

from __future__ import annotations

import os

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from algorithms import REGISTRY, make_config
from algorithms.iql_bd import BellmanDistillConfig
from tokenrl.run.config import RunConfig, compose_config, make_run_config, refuse_unknown_algo
from tokenrl.tasks.hf import HFTaskConfig
from tokenrl.tasks.base import SyntheticTaskConfig

CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "conf")


def _options(group: str) -> list[str]:
    return sorted(f[:-5] for f in os.listdir(os.path.join(CONF, group)) if f.endswith(".yaml"))


def _compose(overrides: list[str]):
    return compose_config(CONF, overrides)


def test_algo_yamls_are_presets_not_algorithms():
    """A YAML named like a registered algorithm would shadow its generated config (and Hydra would warn)."""
    assert _options("algo") and not set(_options("algo")) & set(REGISTRY)


@pytest.mark.parametrize("algo", sorted(REGISTRY))
def test_every_registered_algorithm_composes_with_no_yaml(algo):
    cfg = _compose([f"algo={algo}"])
    assert cfg.algo.name == algo and cfg.algo.preset == algo
    assert make_config(algo, OmegaConf.to_container(cfg.algo)) == REGISTRY[algo].config_cls()


@pytest.mark.parametrize("preset", _options("algo"))
def test_preset_yaml_names_itself_and_lists_only_what_differs(preset):
    with open(os.path.join(CONF, "algo", f"{preset}.yaml")) as f:
        yaml = OmegaConf.create(f.read())
    (parent,) = yaml.defaults
    algo = parent.removeprefix("/schema/algo/").removesuffix("@_here_")
    assert algo in REGISTRY, f"{preset}.yaml extends {parent}, not a registered algorithm's schema"
    assert yaml.preset == preset
    defaults = REGISTRY[algo].config_cls()
    changed = {k: v for k, v in yaml.items() if k not in ("defaults", "preset")}
    assert changed and all(getattr(defaults, k) != v for k, v in changed.items()), f"{preset} restates defaults"
    cfg = _compose([f"algo={preset}"])
    assert cfg.algo.name == algo and cfg.algo.preset == preset
    built = make_config(algo, OmegaConf.to_container(cfg.algo))
    assert all(getattr(built, k) == v for k, v in changed.items())
    make_run_config(cfg).algo.check()  # a preset is a valid config


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


@pytest.mark.parametrize("args", [["algo=no_such_algo"], ["steps=2", "algo=bc,no_such_algo"], ["+algo=no_such_algo"]])
def test_unknown_algorithm_on_the_command_line_says_how_to_register(args):
    with pytest.raises(SystemExit) as err:
        refuse_unknown_algo(args, CONF)
    msg = str(err.value)
    assert "'no_such_algo'" in msg and "iql_bd_math" in msg and all(name in msg for name in REGISTRY)
    assert "tokenrl.algorithms" in msg and "pyproject.toml" in msg


def test_known_algorithms_and_presets_pass_the_command_line_check():
    refuse_unknown_algo(["algo=bc,iql_bd_math", "algo.lr=0.1", "algo=glob(*)"], CONF)


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
