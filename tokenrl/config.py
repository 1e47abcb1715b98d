"""Structured (dataclass) schemas for the Hydra configs under ``experiments/conf``.

Every YAML in a config group extends one of these schemas, so an unknown key or a wrongly typed value fails
when the config is composed, before any work starts. The algorithm schemas are generated from the
algorithm registry, so a newly registered algorithm only needs its YAML.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from algorithms import REGISTRY
from tokenrl.tasks import SyntheticTaskConfig
from tokenrl.trainer import ModelConfig, RunConfig


@dataclass
class SyntheticTaskNode(SyntheticTaskConfig):
    """Schema of ``task=synthetic``."""

    kind: str = "synthetic"
    shard_prompts: int = 256  # prompts per data shard
    cache_batch_size: int = 64  # sequences per teacher forward in the cache pass


@dataclass
class HFTaskNode:
    """Schema of the transformers tasks (``task=smollm2``, ``task=dolly_gpt2``, ``task=dolly_qwen``)."""

    name: str = "hf"
    kind: str = "hf"
    teacher: str = "???"  # hub id, local directory, or directory holding the GGUF file
    teacher_gguf_file: str | None = None  # GGUF file name inside ``teacher`` (or a direct path)
    teacher_dtype: str = "float32"  # teacher parameter dtype
    prompts_file: str = "???"  # Dolly-style JSONL (instruction, context, response)
    instruction_field: str = "instruction"
    context_field: str = "context"
    response_field: str = "response"
    template: str = "minillm"  # minillm (the MiniLLM/BD template) | chat (tokenizer.apply_chat_template)
    max_prompt_tokens: int = 256  # longer prompts are dropped (counted in metrics)
    max_new_tokens: int = 128  # response budget
    val_fraction: float = 0.05
    test_fraction: float = 0.1
    max_train_prompts: int | None = None  # cap the number of training prompts (None = all)
    max_val_prompts: int | None = None  # cap the number of validation prompts (held-out KL, val_every)
    max_test_prompts: int | None = None  # cap the number of evaluation prompts
    samples_per_prompt: int = 1  # teacher samples per training prompt (the paper uses 8)
    sample_top_p: float = 0.8  # teacher sampling top-p for the offline data (= training p)
    sample_temperature: float = 1.0
    cache_top_p: float = 0.8  # p of the stored teacher top-p sets
    cache_max_k: int | None = None  # optional cap on cached set sizes
    n_references: int = 1  # held-out teacher answers per test prompt used as references (plus ground truth)
    data_seed: int = 1234
    shard_prompts: int = 64
    cache_batch_size: int = 8
    gen_batch_size: int = 16  # prompts per teacher sampling batch
    eval_cache_dir: str | None = None  # cache of the build-time teacher samples (references, held-out KL); None = off


def _algo_node(name: str):
    spec = REGISTRY[name]
    return dataclasses.make_dataclass(
        f"{spec.config_cls.__name__}Node", [("name", str, field(default=name))], bases=(spec.config_cls,)
    )


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore (call before composing)."""
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    for name in REGISTRY:
        cs.store(group="schema/algo", name=name, node=_algo_node(name))
    cs.store(group="schema/task", name="synthetic", node=SyntheticTaskNode)
    cs.store(group="schema/task", name="hf", node=HFTaskNode)
    cs.store(group="schema/model", name="model", node=ModelConfig)
