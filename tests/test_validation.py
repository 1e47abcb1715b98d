"""Issue 9, inputs: every bad setting is refused at start-up, before any data, model or evaluation work."""

from __future__ import annotations

import os

import pytest
from hydra import compose, initialize_config_dir
from omegaconf.errors import ConfigKeyError

from tests.conftest import algo_options
from tests.test_hf_task import _write_teacher
from tests.test_models import tiny_llama, word_tokenizer
from tokenrl.run.config import make_run_config, register_configs
from tokenrl.tasks.prompts import load_jsonl_prompts
from tokenrl.run.trainer import run
from tokenrl.run.checks import ConfigError, check_config

CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "conf")


def _cfg(tmp_path, algo=None, **top):
    return make_run_config({
        "algo": {"name": "iql_bd", **(algo or {})}, "progress": False, "data_dir": str(tmp_path / "data"), **top,
    })


@pytest.mark.parametrize(
    "algo, top, key",
    [
        (None, {"steps": -1}, "steps=-1"),
        (None, {"batch_size": 0}, "batch_size=0"),
        ({"alpha": 0.0}, {}, "algo.alpha=0.0"),
        (None, {"task": {"max_new_tokens": 0}}, "task.max_new_tokens=0"),
        ({"top_p": 0.9}, {"task": {"cache_top_p": 0.8}}, "task.cache_top_p=0.8 < algo.top_p=0.9"),
        ({"name": "kd", "top_p": 1.0}, {"task": {"cache_top_p": 0.8}}, "task.cache_top_p=0.8 < algo.top_p=1.0"),
        ({**algo_options("iql_bd_released"), "top_p": 1.0}, {}, "algo.kd_coef=0.5 with algo.top_p=1.0"),
        (None, {"eval": {"seeds": []}}, "eval.seeds=[]"),
        (None, {"eval": {"n_prompts": 0}}, "eval.n_prompts=0"),
        (None, {"on_divergence": "ignore"}, "on_divergence='ignore'"),
        ({"q_shift": "max"}, {}, "algo.q_shift='max'"),
        (None, {"model": {"kind": "pretrained"}}, "model.kind='pretrained'"),
        (None, {"model": {"hidden_size": 30, "num_heads": 4}}, "model.hidden_size=30"),
        (None, {"task": {"kind": "hf", "teacher": "x", "prompts_file": "/no/such.jsonl"}}, "task.prompts_file"),
    ],
)
def test_bad_setting_is_refused_before_any_work(tmp_path, algo, top, key):
    cfg = _cfg(tmp_path, algo, **top)
    with pytest.raises(ConfigError) as err:
        run(cfg, str(tmp_path / "out"))
    assert key in str(err.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "data").exists()


@pytest.mark.parametrize("algo", [{"name": "iql_bd"}, {**algo_options("iql_bd_released"), "kd_coef": 0.0}])
def test_full_vocabulary_td_needs_no_full_cache(tmp_path, algo):
    """At p = 1 BD reads dense logits only, so the default top-0.8 cache is enough (soft_q's teacher reward
    reads the cache: see test_cache_p_is_checked_only_where_the_loss_reads_the_cache)."""
    check_config(_cfg(tmp_path, {**algo, "top_p": 1.0}, task={"cache_top_p": 0.8}))


def test_all_problems_are_reported_at_once(tmp_path):
    with pytest.raises(ConfigError) as err:
        check_config(_cfg(tmp_path, {"alpha": -1.0, "q_shift": "max", "lr": 0.0}, steps=-1, batch_size=0))
    message = str(err.value)
    assert "steps=-1" in message and "batch_size=0" in message and "algo.alpha=-1.0" in message
    assert "algo.q_shift='max'" in message and "algo.lr=0.0" in message  # the algorithm config's own checks
    assert "set batch_size=" in message  # the fix


@pytest.mark.parametrize(
    "name, options, keys",
    [
        ("iql_bd", {"gamma": 1.5, "chi2_on": "both", "value": "released", "epsilon": 0.0}, ["algo.gamma", "algo.chi2_on", "algo.epsilon"]),
        ("soft_q", {"reward": "sqil", "gamma": 1.0, "target_update_rate": 0.0}, ["gamma < 1", "algo.target_update_rate"]),
        ("kd", {"student_norm": "set", "top_p": 0.0}, ["algo.student_norm", "algo.top_p"]),
        ("gkd", {"beta": 2.0, "temperature": 0.0}, ["algo.beta", "algo.temperature"]),
        ("minillm", {"mix": 1.0, "clip_eps": 0.0}, ["algo.mix", "algo.clip_eps"]),
    ],
)
def test_an_algorithm_config_lists_all_its_problems_and_the_algorithm_refuses_it(name, options, keys):
    from algorithms import make_algorithm, make_config
    from tests.conftest import tiny_llama as tiny_student
    from tokenrl.lm.policy import CausalLMPolicy

    config = make_config(name, options)  # building the dataclass checks nothing: the run lists every problem
    assert len(config.problems()) == len(keys) and all(any(k in p for p in config.problems()) for k in keys)
    with pytest.raises(ValueError) as err:
        make_algorithm(name, CausalLMPolicy(tiny_student(), vocab_size=64), config)
    assert all(k in str(err.value) for k in keys)


def test_default_config_is_valid(tmp_path):
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=CONF):
        for algo in ("iql_bd", "iql_bd_math", "iql_bd_released", "bc", "kd", "soft_q", "gkd", "minillm"):
            check_config(make_run_config(compose(config_name="config", overrides=[f"algo={algo}"])))


@pytest.mark.parametrize(
    "algo, refused",
    [
        ({"name": "gkd", "top_p": 1.0}, False),  # the whole vocabulary from the teacher, not the cache
        ({"name": "minillm", "top_p": 1.0}, False),
        ({"name": "soft_q", "reward": "sqil", "top_p": 1.0}, False),  # SQIL's reward needs no teacher
        ({"name": "gkd", "top_p": 0.9}, True),
        ({"name": "soft_q", "top_p": 1.0}, True),  # reward log pi*(a|s) is read from the cache
        ({"name": "kd", "top_p": 1.0}, True),
    ],
)
def test_cache_p_is_checked_only_where_the_loss_reads_the_cache(tmp_path, algo, refused):
    cfg = make_run_config({"algo": algo, "task": {"cache_top_p": 0.8}, "data_dir": str(tmp_path / "data")})
    if refused:
        with pytest.raises(ConfigError, match="task.cache_top_p=0.8 < algo.top_p"):
            check_config(cfg)
    else:
        check_config(cfg)


def test_appended_unknown_key_is_refused():
    """`+foo=1` adds the key in Hydra; the typed config refuses it, naming it."""
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=CONF):
        cfg = compose(config_name="config", overrides=["+foo=1"])
    with pytest.raises(ConfigKeyError, match="foo"):
        make_run_config(cfg)


def test_non_utf8_prompt_file_names_file_and_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(b'{"instruction": "fine"}\n{"instruction": "caf\xe9"}\n')
    with pytest.raises(ValueError) as err:
        load_jsonl_prompts(str(path))
    assert f"{path}:2" in str(err.value) and "UTF-8" in str(err.value) and "0xe9" in str(err.value)


def test_student_tokenizer_mismatch_is_refused_before_data_is_written(tmp_path):
    _write_teacher(str(tmp_path / "teacher"))
    other = word_tokenizer(["the", "dog", "cat", "sat", "ran", "on", "mat"])
    tiny_llama(len(other)).save_pretrained(tmp_path / "student")
    other.save_pretrained(tmp_path / "student")
    (tmp_path / "prompts.jsonl").write_text("".join(f'{{"instruction": "the cat sat {i}"}}\n' for i in range(12)))
    cfg = _cfg(
        tmp_path,
        task={"kind": "hf", "name": "tiny", "teacher": str(tmp_path / "teacher"), "prompts_file": str(tmp_path / "prompts.jsonl"),
              "max_new_tokens": 4, "val_fraction": 0.2, "test_fraction": 0.2},
        model={"kind": "pretrained", "name_or_path": str(tmp_path / "student")},
        eval={"seeds": [0]},
    )
    with pytest.raises(ValueError, match="differ at token id") as err:
        run(cfg, str(tmp_path / "out"))
    assert str(tmp_path / "student") in str(err.value) and str(tmp_path / "teacher") in str(err.value)
    assert not (tmp_path / "data").exists()
