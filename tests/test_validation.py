"""Issues 9 and 20, inputs: every bad setting is refused at start-up, before any data, model or evaluation work,
and before anything is written; every numeric key is checked finite and in its range."""

from __future__ import annotations

import dataclasses
import os

import pytest
from omegaconf.errors import ConfigKeyError

from tests.conftest import algo_options
from tests.test_hf_task import _write_teacher
from tests.test_models import tiny_gpt2, tiny_llama, word_tokenizer
from algorithms import REGISTRY
from tokenrl.run.checks import ConfigError, check_config, config_problems
from tokenrl.run.config import compose_config, compose_run_config, make_run_config
from tokenrl.run.trainer import run
from tokenrl.tasks.prompts import load_jsonl_prompts

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
        # Issue 20: each used to pass the check, or fail later without naming the key.
        ({"lr": float("inf")}, {}, "algo.lr=inf: must be a finite number > 0"),
        ({"top_p": float("nan")}, {}, "algo.top_p=nan"),
        ({"top_p": 0.0}, {}, "algo.top_p=0.0"),
        ({"top_p": 1.0000001}, {}, "algo.top_p=1.0000001"),
        ({"grad_clip": float("nan")}, {}, "algo.grad_clip=nan: must be a finite number"),
        (None, {"task": {"data_seed": -3}}, "task.data_seed=-3"),
        (None, {"eval": {"val_every_s": -1.0}}, "eval.val_every_s=-1.0"),
        (None, {"micro_batch_size": 0}, "micro_batch_size=0"),
        (None, {"micro_batch_size": 3, "batch_size": 4}, "micro_batch_size=3 does not divide batch_size=4"),
        (None, {"max_skipped_fraction": 1.5}, "max_skipped_fraction=1.5"),
        (None, {"task": {"language": {"smoothing": 0.0}}}, "task.language.smoothing=0.0"),
        (None, {"selection": {"sft_patience": 0}}, "selection.sft_patience"),
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
        check_config(_cfg(
            tmp_path, {"alpha": -1.0, "q_shift": "max", "lr": float("inf"), "top_p": float("nan")}, steps=-1,
            batch_size=0, micro_batch_size=0, task={"data_seed": -3}, eval={"val_every_s": -1.0},
        ))
    lines = str(err.value).splitlines()[1:]
    keys = ["steps", "batch_size", "micro_batch_size", "algo.alpha", "algo.q_shift", "algo.lr", "algo.top_p",
            "task.data_seed", "eval.val_every_s"]
    assert sorted(line.strip().split("=")[0] for line in lines) == sorted(keys)  # each once, all of them
    assert "set batch_size=" in str(err.value)  # the fix


def _numeric_fields(node, prefix=""):
    """``(dotted key, value)`` of every int and float field of a config tree (bools excluded)."""
    for f in dataclasses.fields(node):
        value, key = getattr(node, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from _numeric_fields(value, f"{key}.")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield key, value


def _with(config: dict, key: str, value) -> dict:
    """``config`` (nested dicts) with the dotted ``key`` set to ``value``."""
    head, _, rest = key.partition(".")
    return {**config, head: _with(config.get(head, {}), rest, value) if rest else value}


@pytest.mark.parametrize(
    "algo, task", [("iql_bd", "synthetic"), ("iql_bd", "hf"), *((name, None) for name in sorted(REGISTRY))]
)
def test_every_numeric_key_is_checked_finite_and_in_range(tmp_path, algo, task):
    """Floats: NaN and infinity refused, naming the key. Ints (counts, sizes, steps, seeds, ids): a large negative
    value refused, naming the key, so every int field states its range in its config's ``problems()``. Every
    field of the run with each task; the algorithm's fields of every registered algorithm (``task`` None)."""
    base = {"algo": {"name": algo}, "data_dir": str(tmp_path)}
    if task == "hf":
        base["task"] = {"kind": "hf", "teacher": "t", "prompts_file": "p"}
    fields = [(k, v) for k, v in _numeric_fields(make_run_config(base)) if task or k.startswith("algo.")]
    assert len(fields) > (40 if task else 5)
    for key, value in fields:
        bad = [float("nan"), float("inf")] if isinstance(value, float) else [-10**9]
        for b in bad:
            problems = config_problems(make_run_config(_with(base, key, b)))
            assert any(line.startswith(f"{key}=") for line in problems), (key, b, problems)


def _write_gpt2_teacher(directory) -> None:
    tokenizer = word_tokenizer()
    tiny_gpt2(len(tokenizer)).save_pretrained(directory)  # 64 positions
    tokenizer.save_pretrained(directory)


def test_prompt_and_response_past_the_teachers_context_are_refused_at_start(tmp_path):
    """A GPT-2 teacher with 64 positions and prompt + new tokens past them ended in an IndexError inside sampling."""
    _write_gpt2_teacher(tmp_path / "teacher")
    (tmp_path / "prompts.jsonl").write_text("".join(f'{{"instruction": "the cat sat {i}"}}\n' for i in range(12)))
    task = {"kind": "hf", "name": "tiny", "teacher": str(tmp_path / "teacher"), "prompts_file": str(tmp_path / "prompts.jsonl"),
            "max_prompt_tokens": 40, "max_new_tokens": 30}
    with pytest.raises(ConfigError) as err:
        run(_cfg(tmp_path, task=task), str(tmp_path / "out"))
    assert "task.max_prompt_tokens + task.max_new_tokens = 40 + 30 = 70 > 64" in str(err.value)
    assert str(tmp_path / "teacher") in str(err.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "data").exists()
    check_config(_cfg(tmp_path, task={**task, "max_new_tokens": 24}))  # 40 + 24 fits


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
    for algo in ("iql_bd", "iql_bd_math", "iql_bd_released", "bc", "kd", "soft_q", "gkd", "minillm"):
        check_config(compose_run_config(CONF, [f"algo={algo}"]))


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
    cfg = compose_config(CONF, ["+foo=1"])
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
              "max_prompt_tokens": 40, "max_new_tokens": 4, "val_fraction": 0.2, "test_fraction": 0.2},
        model={"kind": "pretrained", "name_or_path": str(tmp_path / "student")},
        eval={"seeds": [0]},
    )
    with pytest.raises(ValueError, match="differ at token id") as err:
        run(cfg, str(tmp_path / "out"))
    assert str(tmp_path / "student") in str(err.value) and str(tmp_path / "teacher") in str(err.value)
    assert not (tmp_path / "data").exists()
