"""``experiments/run.py`` with observers, for tests/test_distributed.py (launched by torchrun or plain python).

    python tests/distributed_worker.py TRACE_DIR SNAPSHOT_STEP run.py-overrides...

Runs the real entry point and, without changing what it computes, records per rank into
``TRACE_DIR/rank<r>.pt``: the global batch indices this rank trained on at every optimiser step, the
student's (full) parameters after every step, and every file the trainer wrote (TensorBoard writer, metrics,
student, checkpoints). The checkpoint written at step ``SNAPSHOT_STEP`` is also copied to
``TRACE_DIR/checkpoint_step<k>.safetensors`` (later checkpoints may delete the run's own copy).
"""

from __future__ import annotations

import atexit
import os
import runpy
import shutil
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tokenrl.core.ranks import env_rank  # noqa: E402
from tokenrl.run import distributed, outputs, train_state, trainer  # noqa: E402
from tokenrl.run import step as step_module  # noqa: E402

trace_dir, snapshot_step, overrides = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
rank = env_rank()
trace = {"indices": [], "params": [], "algos": [], "writes": [], "pid": os.getpid()}


def _record_indices(indices, ctx, micro_batch_size):
    parts = _local_micro_batches(indices, ctx, micro_batch_size)
    trace["indices"].append([i for part in parts for i in part])
    return parts


def _record_params(algo, micro_batches, loss_fn, ctx):
    stats = _optimizer_update(algo, micro_batches, loss_fn, ctx)
    # FSDP parameters are DTensor shards: gather the full tensors (a collective every rank runs here).
    full = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in algo.policy.parameters()]
    trace["params"].append(torch.cat([p.detach().reshape(-1).clone() for p in full]))
    trace["algos"].append(algo.name)
    return stats


def _writes(name, fn):
    def wrapper(*args, **kwargs):
        trace["writes"].append(name)
        return fn(*args, **kwargs)

    return wrapper


def _save_checkpoint(out_dir, state, step, keep, **kwargs):
    trace["writes"].append("save_checkpoint")
    path = _save_checkpoint_fn(out_dir, state, step, keep, **kwargs)
    if step == snapshot_step:
        shutil.copy(path, os.path.join(trace_dir, f"checkpoint_step{snapshot_step}.safetensors"))
    return path


_local_micro_batches, _optimizer_update, _save, _save_checkpoint_fn = (
    distributed.local_micro_batches, step_module.optimizer_update, torch.save, train_state.save_checkpoint,
)
distributed.local_micro_batches = _record_indices
step_module.optimizer_update = _record_params
train_state.save_checkpoint = _save_checkpoint
for module in (trainer, outputs):  # tb/ and tb_hparams/
    module.SummaryWriter = _writes("SummaryWriter", module.SummaryWriter)
outputs.save_model = _writes("save_model", outputs.save_model)
outputs.write_json_atomic = _writes("write_json_atomic", outputs.write_json_atomic)
atexit.register(lambda: _save(trace, os.path.join(trace_dir, f"rank{rank}.pt")))

sys.argv = [os.path.join(ROOT, "experiments", "run.py"), *overrides]
runpy.run_path(sys.argv[0], run_name="__main__")
