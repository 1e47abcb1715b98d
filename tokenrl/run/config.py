"""The typed run config: dataclass schemas of ``experiments/conf`` and the one function that builds a :class:`RunConfig`.

Every YAML in a config group extends one of these schemas (registered in Hydra's ConfigStore by
:func:`register_configs`), so an unknown key or a wrongly typed value fails when the config is composed,
before any work starts. The task schemas live next to their builders (:class:`tokenrl.tasks.base.SyntheticTaskConfig`,
:class:`tokenrl.tasks.hf.HFTaskConfig`), the evaluation's next to it (:class:`tokenrl.evaluation.student.EvalConfig`);
the algorithm schemas are generated from the algorithm registry, so a
newly registered algorithm only needs its YAML. Ranges and cross-field constraints of a built config are
checked by :func:`tokenrl.run.checks.check_config`. Every default lives in a schema and nowhere else:

    >>> cfg = make_run_config({"algo": {"name": "bc"}, "steps": 10})   # Python callers and tests
    >>> cfg.task.samples_per_prompt, cfg.model.hidden_size
    (4, 64)
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep
from omegaconf import DictConfig, OmegaConf

from algorithms import REGISTRY, AlgoConfig, get_spec, unknown_algorithm_message
from tokenrl.core.options import AT_LEAST_ONE, HALF_OPEN_UNIT, NON_NEGATIVE, POSITIVE, UNIT_INTERVAL, field_problems
from tokenrl.evaluation.student import EvalConfig
from tokenrl.tasks.hf import HFTaskConfig
from tokenrl.tasks.base import SyntheticTaskConfig

TASK_SCHEMAS: dict[str, type] = {"synthetic": SyntheticTaskConfig, "hf": HFTaskConfig}
"""``task.kind`` -> the schema of that task node."""

MODEL_KINDS = ("fresh", "pretrained", "pruned")
ON_DIVERGENCE = ("stop", "skip")
"""``on_divergence`` choices: stop the run (its last good checkpoint stays), or skip the update and count it."""


@dataclass
class ModelConfig:
    """The student network."""

    kind: str = "fresh"  # fresh (new model from the fields below) | pretrained | pruned (layer-pruned teacher)
    arch: str = "llama"  # model_type of a fresh student
    hidden_size: int = 64  # fresh: width
    num_layers: int = 2  # fresh: decoder blocks
    num_heads: int = 4  # fresh: attention heads
    intermediate_size: int = 256  # fresh: MLP width
    name_or_path: str | None = None  # pretrained: hub id or local directory
    gguf_file: str | None = None  # pretrained: GGUF file inside name_or_path (or a direct path)
    keep_every: int = 2  # pruned: keep every k-th teacher block (and the last)
    dtype: str = "float32"  # parameter dtype
    # Recompute each decoder block's activations in the backward pass instead of storing them (transformers'
    # gradient checkpointing): less training memory for ~one extra forward; same loss and gradients.
    gradient_checkpointing: bool = False

    def problems(self, prefix: str = "model") -> list[str]:
        """Every field out of its range or choices, one line each (see :mod:`tokenrl.core.options`)."""
        ranges = {"hidden_size": POSITIVE, "num_layers": POSITIVE, "num_heads": POSITIVE, "intermediate_size": POSITIVE,
                  "keep_every": AT_LEAST_ONE}
        return field_problems(self, prefix, ranges, choices={"kind": MODEL_KINDS})


@dataclass
class DistConfig:
    """Data-parallel training under ``torchrun`` (ignored by a single-process run)."""

    strategy: str = "ddp"  # ddp: replicated student (DistributedDataParallel) | fsdp: sharded student (fully_shard)
    timeout_min: float = 60.0  # collective timeout; other ranks wait this long while rank 0 evaluates

    def problems(self, prefix: str = "dist") -> list[str]:
        """Every field out of its range or choices, one line each (see :mod:`tokenrl.core.options`)."""
        return field_problems(self, prefix, {"timeout_min": POSITIVE}, choices={"strategy": ("ddp", "fsdp")})


@dataclass
class SelectionConfig:
    """How the SFT start and the reported weights are chosen (``selection=fixed`` | ``selection=best``).

    Validation = the teacher-forced ``metric`` on the task's held-out teacher samples (validation prompts),
    lower is better; see :mod:`tokenrl.run.selection`. The SFT start stops by a moving average of its validation
    scores (:class:`tokenrl.run.selection.PlateauStop`), so that the noise of single validations does not stop it.
    """

    metric: str = "kl_student_teacher"  # a key of tokenrl.evaluation.student.VALIDATION_METRICS
    sft_eval_every: int = 0  # validate the SFT warm start every n steps and stop when it stops improving; 0 = run all sft_steps
    # The SFT stopping rule (with sft_eval_every > 0): the smoothed score s_i = sft_smoothing * s_{i-1} +
    # (1 - sft_smoothing) * score_i "improves" when it falls below its best so far by sft_min_improvement times the
    # best's magnitude; SFT stops after sft_patience validations without improvement and keeps the best raw-scored
    # weights (tokenrl.run.selection.PlateauStop).
    # sft_smoothing=0, sft_min_improvement=0 is plain patience on the raw scores.
    sft_patience: int = 6  # validations without improvement of the smoothed score before SFT stops
    sft_smoothing: float = 0.8  # weight of the past in the moving average, in [0, 1) (~ (1+x)/(1-x) validations)
    sft_min_improvement: float = 0.001  # relative fall of the smoothed score that counts as improvement, in [0, 1)
    sft_cache: bool = False  # save the SFT start under data_dir and reuse it (keyed by model, SFT settings, seed)
    every: int = 0  # validate the algorithm every n steps (step 0 = the SFT start) and report the best weights; 0 = the last

    def problems(self, prefix: str = "selection") -> list[str]:
        """Every field out of its range, one line each (see :mod:`tokenrl.core.options`); the metric is checked
        against the metrics :mod:`tokenrl.run.selection` computes (``check_selection``)."""
        ranges = {"sft_eval_every": NON_NEGATIVE.explained("0 = off"), "every": NON_NEGATIVE.explained("0 = off"),
                  "sft_patience": AT_LEAST_ONE, "sft_smoothing": HALF_OPEN_UNIT, "sft_min_improvement": HALF_OPEN_UNIT}
        return field_problems(self, prefix, ranges)


@dataclass
class RunConfig:
    """Top-level run settings (``algo`` and ``task`` come from their config groups)."""

    algo: Any = None  # the algorithm's config dataclass plus its registry ``name`` and ``preset`` (see :func:`algo_schema`)
    task: Any = None  # a :data:`TASK_SCHEMAS` dataclass, chosen by ``task.kind``
    model: ModelConfig = field(default_factory=ModelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    seed: int = 0  # training seed: student init, batch sampling, evaluation draws
    steps: int = 1000  # gradient updates of the algorithm
    sft_steps: int = 0  # SFT (BC) warm start on the offline data before the algorithm (the paper's recipe); the maximum with selection.sft_eval_every
    sft_lr: float = 1e-3  # learning rate of the SFT warm start
    batch_size: int = 32  # trajectories per update (the global batch over all ranks and accumulation steps)
    micro_batch_size: int | None = None  # trajectories per forward/backward (None = batch_size / world size)
    device: str = "cpu"  # torch device
    # fp32 | bf16: bfloat16 autocast of the student's training forward, float32 master weights and AdamW state
    # (tokenrl.lm.precision; sampling and evaluation stay in the weights' dtype)
    precision: str = "fp32"
    compile: bool = False  # torch.compile the student's decoder body in training (measured in BENCHMARKS.md)
    threads: int = 1  # torch intra-op threads (0 = torch default); 1 avoids oversubscribing a shared small CPU
    log_every: int = 20  # TensorBoard scalar interval
    checkpoint_every: int = 0  # checkpoint every n steps (0 = time-based only)
    checkpoint_seconds: float = 60.0  # also checkpoint when this many seconds passed since the last one (0 = off)
    keep_checkpoints: int = 3  # newest checkpoints kept; resume falls back to an older one if the newest is damaged
    resume: bool = False  # continue from the newest checkpoint in the output directory (an error if none)
    # non-finite or out-of-range loss/grad norm/weight norm: stop (the last good checkpoint stays) | skip (count)
    on_divergence: str = "stop"
    # out of range = beyond the running [min, max] by this many times its width; weights: this many times their start norm
    divergence_factor: float = 10.0
    max_skipped_fraction: float = 0.1  # on_divergence=skip stops the run past this fraction of skipped updates (of >= 20)
    data_dir: str = "data_cache"  # where offline teacher data are cached (shared across runs)
    rollout_every: int = 0  # add student rollouts to the buffer every n steps (0 = only if the algorithm needs them: 10)
    rollout_prompts: int = 32  # prompts per rollout batch
    init_eval: bool = True  # evaluate the untrained student too
    teacher_eval: bool = True  # evaluate the teacher's own samples (the reference row)
    progress: bool = True  # progress bars on a terminal, a plain line every 30 s otherwise; false = silent

    @property
    def algo_name(self) -> str:
        """The registry name of the algorithm (the ``algo=<name>`` of a plain run, or the algorithm a preset sets)."""
        return self.algo.name

    @property
    def algo_preset(self) -> str:
        """What ran, as reports and output directories name it: the preset (``iql_bd_math``) or the algorithm."""
        return self.algo.preset

    def algo_config(self) -> AlgoConfig:
        """The algorithm's own config dataclass (without the registry ``name``)."""
        spec = get_spec(self.algo_name)
        values = {f.name: getattr(self.algo, f.name) for f in dataclasses.fields(spec.config_cls)}
        return spec.config_cls(**values)

    def problems(self) -> list[str]:
        """Every field of the run config out of its range or choices, its nodes' (model, eval, dist, task, algo)
        included, one line each; cross-field rules that need files or devices are in :mod:`tokenrl.run.checks`."""
        ranges = {
            "seed": NON_NEGATIVE, "steps": NON_NEGATIVE, "sft_steps": NON_NEGATIVE, "sft_lr": POSITIVE,
            "batch_size": POSITIVE, "micro_batch_size": POSITIVE.explained("null = batch_size / world size"),
            "threads": NON_NEGATIVE.explained("0 = torch default"), "log_every": POSITIVE,
            "checkpoint_every": NON_NEGATIVE.explained("0 = time-based only"),
            "checkpoint_seconds": NON_NEGATIVE.explained("0 = step-based only"), "keep_checkpoints": AT_LEAST_ONE,
            "divergence_factor": POSITIVE, "max_skipped_fraction": UNIT_INTERVAL, "rollout_every": NON_NEGATIVE,
            "rollout_prompts": POSITIVE,
        }
        found = field_problems(self, "", ranges, choices={"on_divergence": ON_DIVERGENCE})
        micro = self.micro_batch_size
        if micro and micro > 0 and self.batch_size > 0 and self.batch_size % micro:
            found.append(
                f"micro_batch_size={micro} does not divide batch_size={self.batch_size}; set micro_batch_size to a "
                "divisor of batch_size"
            )
        found += self.model.problems() + self.eval.problems() + self.dist.problems() + self.selection.problems()
        found += self.task.problems("task") + self.algo.problems()
        return found


@functools.cache
def algo_schema(name: str) -> type:
    """The schema of ``algo=<name>``: the registered config dataclass plus its ``name`` and ``preset`` (one class
    per name; a preset YAML sets ``preset`` to its own name, a plain run keeps the algorithm's)."""
    spec = get_spec(name)
    extra = [("name", str, field(default=name)), ("preset", str, field(default=name))]
    return dataclasses.make_dataclass(f"{spec.config_cls.__name__}Node", extra, bases=(spec.config_cls,))


def make_run_config(cfg: Mapping | DictConfig | RunConfig) -> RunConfig:
    """The typed run config, built once from a composed Hydra config or a plain nested dict.

    Missing keys take the schema defaults; unknown keys and wrong types raise (omegaconf's errors name the
    key). ``task.kind`` (default ``synthetic``) picks the task schema and ``algo.name`` the algorithm's.

    Args:
        cfg: the config of ``experiments/run.py`` (a DictConfig), the same as a dict, or a RunConfig
            (returned unchanged).

    Raises:
        ValueError: no ``algo.name``, or an unknown ``task.kind``.
        KeyError: an unregistered ``algo.name`` (the message lists the registered names and how to register).
    """
    if isinstance(cfg, RunConfig):
        return cfg
    raw = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    algo_name = (raw.get("algo") or {}).get("name")
    if algo_name is None:
        raise ValueError(f"the run config needs algo.name (one of {sorted(REGISTRY)})")

    kind = (raw.get("task") or {}).get("kind", "synthetic")
    if kind not in TASK_SCHEMAS:
        raise ValueError(f"unknown task.kind {kind!r}; expected one of {sorted(TASK_SCHEMAS)}")
    schema = OmegaConf.structured(RunConfig)
    schema.algo = OmegaConf.structured(algo_schema(algo_name))
    schema.task = OmegaConf.structured(TASK_SCHEMAS[kind])
    return OmegaConf.to_object(OmegaConf.merge(schema, raw))


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore (call before composing).

    Every registered algorithm gets ``algo/<name>`` (its schema with the defaults: ``algo=<name>`` needs no
    YAML, so there must be none of that name) and ``schema/algo/<name>`` (what preset YAMLs extend).
    """
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    for name in REGISTRY:
        cs.store(group="algo", name=name, node=algo_schema(name))
        cs.store(group="schema/algo", name=name, node=algo_schema(name))
    for kind, schema in TASK_SCHEMAS.items():
        cs.store(group="schema/task", name=kind, node=schema)
    cs.store(group="schema/model", name="model", node=ModelConfig)
    cs.store(group="schema/selection", name="selection", node=SelectionConfig)


def compose_config(conf_dir: str, overrides: Sequence[str] = (), config_name: str = "config") -> DictConfig:
    """``conf_dir`` composed with ``overrides`` as its entry point composes it (``experiments/conf``:
    ``experiments/run.py``'s ``config``, or ``experiments/benchmark.py``'s ``benchmark``), from Python.

    The schemas are registered first. Inside another Hydra app (a script's own ``@hydra.main``) the app's Hydra is
    set aside for the composition and restored after it, so the result depends on ``conf_dir`` alone.

    Raises:
        hydra.errors.ConfigCompositionException, omegaconf errors: an unknown key or option, named.
    """
    register_configs()
    outer = GlobalHydra.instance().hydra if GlobalHydra.instance().is_initialized() else None
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(version_base="1.3", config_dir=os.path.abspath(conf_dir)):
            return compose(config_name=config_name, overrides=list(overrides))
    finally:
        if outer is not None:
            GlobalHydra.instance().initialize(outer)


def compose_run_config(conf_dir: str, overrides: Sequence[str] = ()) -> RunConfig:
    """The typed config of ``experiments/run.py <overrides>`` (:func:`compose_config`, :func:`make_run_config`)."""
    return make_run_config(compose_config(conf_dir, overrides))


def compose_algo(conf_dir: str, algo: str) -> dict:
    """The ``algo`` node of ``algo=<algo>`` (an algorithm with its schema defaults, or a preset YAML of
    ``conf_dir/algo``) as a dict, its ``name`` and ``preset`` included."""
    return OmegaConf.to_container(compose_config(conf_dir, [f"algo={algo}"]).algo, resolve=True)


def refuse_unknown_algo(args: Sequence[str], conf_dir: str) -> None:
    """Stop before Hydra composes when an ``algo=`` override names neither an algorithm nor a preset.

    Hydra's own error says only that it could not find ``algo/<name>``; this one lists the registered
    algorithms and the presets (``conf_dir/algo/*.yaml``) and says how to register an algorithm.

    Args:
        args: the command line's overrides (``sys.argv[1:]``); sweeps (``algo=bc,kd``) are checked name by name.
        conf_dir: the Hydra config directory of the entry point.

    Raises:
        SystemExit: naming the unknown algorithm.
    """
    algo_dir = os.path.join(conf_dir, "algo")
    presets = sorted(f[: -len(".yaml")] for f in os.listdir(algo_dir) if f.endswith(".yaml"))
    parser = OverridesParser.create()
    for arg in args:
        if arg.lstrip("+").partition("=")[0] != "algo":
            continue
        (override,) = parser.parse_overrides([arg])
        value = override.value()
        # A plain name or a list of names (algo=bc,kd); range and glob sweeps are left to Hydra.
        names = [value] if isinstance(value, str) else value.list if isinstance(value, ChoiceSweep) else []
        for name in names:
            if name not in REGISTRY and name not in presets:
                sys.exit(f"{arg}: {unknown_algorithm_message(name, presets)}")
