"""The run's outputs in its directory: the student (safetensors and ``save_pretrained``), ``metrics.json`` and the
hyper-parameters with the final metrics for TensorBoard's HParams tab (``tb_hparams/``)."""

from __future__ import annotations

import dataclasses
import os

from safetensors.torch import save_model
from torch.utils.tensorboard import SummaryWriter

from tokenrl.core.files import apply_umask_to_tree, publish
from tokenrl.data.buffer import write_json_atomic
from tokenrl.lm.models import save_student
from tokenrl.run import distributed
from tokenrl.run.checkpoint import _flatten
from tokenrl.run.context import RunContext


def save_outputs(ctx: RunContext, last_stats: dict[str, float]) -> None:
    """Write the student (safetensors and ``save_pretrained``) and ``metrics.json`` (rank 0 only)."""
    if not ctx.dist.is_main:
        return
    model, out_dir = distributed.plain_copy(ctx.model, ctx.loss_fn), ctx.out_dir
    tmp = os.path.join(out_dir, f"student.safetensors.tmp-{os.getpid()}")
    save_model(model, tmp)  # drops the duplicate of tied embeddings (SmolLM2, Qwen2.5-0.5B) instead of failing
    publish(tmp, os.path.join(out_dir, "student.safetensors"))
    if ctx.task.tokenizer is not None:
        save_student(model, ctx.task.tokenizer, os.path.join(out_dir, "student"))
    else:
        model.save_pretrained(os.path.join(out_dir, "student"))
        apply_umask_to_tree(os.path.join(out_dir, "student"))  # safetensors writes its weights 0600
    ctx.results["train"] = {
        "steps": ctx.cfg.steps, "last_stats": last_stats, "data_dir": ctx.data_dir, "skipped_steps": ctx.skipped_steps,
        **ctx.timings,
    }
    ctx.results["task_info"] = ctx.task.info
    # The run's hyper-parameters with its final metrics, for TensorBoard's HParams tab (it compares runs by them),
    # before metrics.json marks the run finished; in tb_hparams/, as tb/ keeps the one event file of training.
    hparams = {
        key: value if isinstance(value, (bool, int, float, str)) else str(value)
        for key, value in _flatten(dataclasses.asdict(ctx.cfg)).items()
    }
    final = {
        f"hparam/{key}": float(value) for key, value in ctx.results["final_eval"].items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }
    with SummaryWriter(os.path.join(out_dir, "tb_hparams")) as writer:
        writer.add_hparams(hparams, final, run_name=".")
    write_json_atomic(os.path.join(out_dir, "metrics.json"), ctx.results)
