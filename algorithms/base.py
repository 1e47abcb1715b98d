"""What every algorithm shares: optimiser settings, the AdamW + warm-up/cosine schedule and the update step.

An algorithm subclasses :class:`Algorithm` and implements ``compute_loss(batch) -> (loss, stats)`` from a
pure loss function; the rest of a step is shared: :meth:`Algorithm.backward` (the divergence guard, then the
gradient) and :meth:`Algorithm.optimizer_step` (clipping, step, schedule, lr and grad-norm stats). The trainer
asks for the loss of each micro-batch through its DDP/FSDP wrapper and accumulates
(:func:`tokenrl.run.step.optimizer_update`); :meth:`Algorithm.update` is the same step on one batch in one
process (tests, scripts).

Batches are drawn by the algorithm's sampler (:meth:`Algorithm.make_sampler`, :mod:`tokenrl.data.samplers`):
uniformly from the whole buffer by default; an on-policy algorithm mixes in its newest rollouts.

An on-policy algorithm (``needs_rollouts``) also declares how the trainer collects and uses its rollouts,
through hooks the trainer calls (``tokenrl.run.rollouts``), none of which samples or steps an env itself:

* :meth:`Algorithm.rollout_policy` ``(student_fn, teacher_fn) -> policy_fn``: the policy the env samples
  from (default: the student, restricted to the teacher's top-p set when ``top_p < 1``);
* :meth:`Algorithm.before_rollout` ``()``: called right before sampling (MiniLLM snapshots its behaviour
  policy here);
* :meth:`Algorithm.after_rollout` ``(indices)``: the buffer indices of the rollouts just added (passed on to the
  sampler);
* :meth:`Algorithm.make_sampler` ``(config) -> BatchSampler``: how each training batch is drawn (GKD and MiniLLM:
  :class:`~tokenrl.data.samplers.RolloutMix`, a fraction of the rows from the newest rollouts).

An algorithm whose loss compares the student with the teacher over the whole vocabulary sets
``needs_teacher_logprobs``; the trainer then adds the teacher's log-probs at every state to each batch
(``batch.teacher_logprobs_BSV``, :func:`tokenrl.lm.scoring.with_teacher_logprobs`, timed as
``time/teacher_score_s``), and its config's :meth:`AlgoConfig.reads_cached_sets` tells the run validation
that the cached top-p sets need not cover ``top_p``.

An algorithm with a language-modelling term on pre-training text (MiniLLM's PT loss, Bellman Distill's LM term
as the papers compute it) sets ``needs_lm_batch``; the trainer then attaches to each batch a batch of the
task's pre-training corpus (``batch.lm_batch``: ``batch_size`` rows drawn uniformly with the run's seeded batch
generator, right after the distillation batch, with the cached sets at the algorithm's ``top_p``; see
:func:`tokenrl.run.step.draw_batches` and :mod:`tokenrl.tasks.corpus`).

A config checks its own options (:meth:`AlgoConfig.problems`: ranges, choices, cross-field rules, all of them
at once); the run's start-up check lists them with the rest of the run's problems and :class:`Algorithm`
refuses a config that has any.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tokenrl.core.divergence import DivergenceGuard
from tokenrl.core.options import HALF_OPEN_UNIT, NON_NEGATIVE, POSITIVE, UNIT_INTERVAL, field_problems
from tokenrl.core.target import TargetNetwork
from tokenrl.core.top_p import PolicyFn, top_p_restricted_policy
from tokenrl.data.buffer import Batch
from tokenrl.data.samplers import BatchSampler
from tokenrl.lm.policy import CausalLMPolicy


@dataclass
class AlgoConfig:
    """Optimiser fields shared by every algorithm (the paper's recipe uses AdamW(0.9, 0.95), wd 1e-6)."""

    lr: float = 1e-3  # peak learning rate (the paper uses 5e-6 for pretrained LMs; tiny fresh students need more)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    weight_decay: float = 1e-6  # AdamW decoupled weight decay
    warmup_steps: int = 20  # linear warm-up steps, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.1  # floor of the cosine schedule as a fraction of lr
    grad_clip: float = 1.0  # max global grad norm (<= 0 disables clipping)

    def problems(self) -> list[str]:
        """Every bad option, one ``"algo.<key>=<value>: must be ...; set ..."`` line each (empty when valid).

        A subclass returns ``super().problems()`` plus its own fields' ranges and choices
        (:func:`tokenrl.core.options.field_problems`) and its cross-field rules.
        """
        ranges = {"lr": POSITIVE, "beta1": HALF_OPEN_UNIT, "beta2": HALF_OPEN_UNIT, "weight_decay": NON_NEGATIVE,
                  "warmup_steps": NON_NEGATIVE, "min_lr_ratio": UNIT_INTERVAL}
        return field_problems(self, "algo", ranges)

    def check(self) -> None:
        """Raise ValueError listing every problem of :meth:`problems`, if any."""
        problems = self.problems()
        if problems:
            raise ValueError(f"invalid {type(self).__name__}:\n  " + "\n  ".join(problems))

    def reads_cached_sets(self) -> bool:
        """True when the loss reads the teacher's cached top-p sets at ``top_p`` (the run's cache must be built at
        a p at least as large); False when ``top_p = 1`` means the whole vocabulary without the cache."""
        return True


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warm-up to 1, then cosine to ``min_ratio`` at ``total`` steps.

    Kept by hand instead of transformers' ``get_cosine_with_min_lr_schedule_with_warmup`` (issue 21) for one
    missing feature: its warm-up multiplier is ``step / warmup``, so the first update runs at lr 0 and every
    warm-up step one step late, and no option shifts it; here it is ``(step + 1) / warmup``, as every result
    of this project was trained. From the end of the warm-up on the two are equal to the bit
    (``tests/test_schedule.py`` checks both at every step).
    """
    if step < warmup:
        return (step + 1) / max(warmup, 1)
    progress = min(1.0, (step - warmup) / max(total - warmup, 1))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class Algorithm:
    """Base class: owns the policy, its optimiser and schedule.

    Args:
        policy: the student (a :class:`CausalLMPolicy`).
        config: the algorithm's config dataclass (a subclass of :class:`AlgoConfig`).
        total_steps: planned number of updates (for the cosine schedule).
    """

    name: str = "base"
    #: the algorithm's config dataclass (read by :func:`algorithms.registry.register` when it is not given, as for
    #: an algorithm registered through the ``tokenrl.algorithms`` entry point group)
    config_class: type[AlgoConfig] | None = None
    #: True when the algorithm learns from its own rollouts (the trainer then collects them into the buffer);
    #: a subclass may make it a property of its config
    needs_rollouts: bool = False
    #: True when ``compute_loss`` reads ``batch.teacher_logprobs_BSV`` (the teacher over the whole vocabulary):
    #: the trainer then adds it to every batch (:func:`tokenrl.lm.scoring.with_teacher_logprobs`); a subclass may
    #: make it a property of its config
    needs_teacher_logprobs: bool = False
    #: True when ``compute_loss`` reads ``batch.lm_batch`` (a batch of the task's pre-training corpus, see the
    #: module docstring): the trainer then builds the corpus and attaches one to every batch; a subclass may make
    #: it a property of its config
    needs_lm_batch: bool = False
    #: True when the algorithm keeps a target network: the base class then builds ``self.target`` (a
    #: :class:`~tokenrl.core.target.TargetNetwork` at the config's ``target_update_rate``), updates it after every
    #: step and saves it in :meth:`state_dict`
    uses_target_network: bool = False

    def __init__(self, policy: CausalLMPolicy, config: AlgoConfig, total_steps: int = 1000):
        config.check()
        self.policy = policy
        self.config = config
        self.total_steps = total_steps
        params = [p for p in policy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            params, lr=config.lr, betas=(config.beta1, config.beta2), weight_decay=config.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: warmup_cosine(s, config.warmup_steps, total_steps, config.min_lr_ratio),
        )
        self.step = 0
        #: set by the trainer: asked before the backward pass (loss) and the optimiser step (grad norm), raising
        #: :class:`~tokenrl.core.divergence.DivergenceError` to refuse the update before it changes anything
        self.guard: DivergenceGuard | None = None
        self.target: TargetNetwork | None = None
        if self.uses_target_network:
            rate = getattr(config, "target_update_rate", None)
            if rate is None:
                raise ValueError(f"{type(config).__name__} needs a target_update_rate field for the target network")
            self.target = TargetNetwork(policy, rate)
        #: draws the rows of every training batch (:meth:`make_sampler`); told of each rollout batch
        self.sampler = self.make_sampler(config)

    @classmethod
    def make_sampler(cls, config: AlgoConfig) -> BatchSampler:
        """How the trainer draws this algorithm's training batches: every row uniformly from the whole buffer.

        A function of the config alone, so that a run can refuse what the sampler does not support (torchrun and
        gradient accumulation for a sampler that is not ``splittable``) before any work.
        """
        return BatchSampler()

    @property
    def top_p(self) -> float | None:
        """The p batches must be restricted to (None = use the cache as stored)."""
        return getattr(self.config, "top_p", None)

    def compute_loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Scalar loss to minimise and detached stats. Implemented by each algorithm."""
        raise NotImplementedError

    def update(self, batch: Batch) -> dict[str, float]:
        """One gradient step on ``batch`` in one process; returns namespaced float stats.

        The trainer's step (:func:`tokenrl.run.step.optimizer_update`) is made of the same pieces, with gradient
        accumulation and the DDP/FSDP wrapper around :meth:`compute_loss`: :meth:`zero_grad`, the loss in train
        mode, :meth:`backward`, :meth:`optimizer_step`.
        """
        self.zero_grad()
        self.policy.train()
        loss, stats = self.compute_loss(batch)
        self.backward(loss, stats)
        return self.optimizer_step(stats)

    def zero_grad(self) -> None:
        """Drop the accumulated gradients."""
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor, stats: dict[str, float], loss_scale: float = 1.0) -> None:
        """Refuse a diverging loss, then add the gradient of ``loss_scale * loss`` to the parameters' gradients.

        Args:
            loss: a (micro-)batch's scalar loss from :meth:`compute_loss`.
            stats: its stats (named in the error of a non-finite loss without a guard).
            loss_scale: weight of this micro-batch's loss in the accumulated gradient.

        Raises:
            DivergenceError: the guard refuses the loss (:mod:`tokenrl.core.divergence`).
            FloatingPointError: no guard is set and the loss is not finite.
        """
        if self.guard is not None:
            self.guard.check(self.step, "loss/total", float(loss.detach()))
        elif not torch.isfinite(loss):
            raise FloatingPointError(f"{self.name}: non-finite loss {loss.item()} at step {self.step}; stats={stats}")
        (loss if loss_scale == 1.0 else loss * loss_scale).backward()

    def optimizer_step(self, stats: dict[str, float]) -> dict[str, float]:
        """Clip the accumulated gradient, step the optimiser and schedule, run :meth:`after_step`.

        Returns ``stats`` with ``optim/lr`` and ``optim/grad_norm`` added.
        """
        clip = self.config.grad_clip if self.config.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), clip)
        # Under FSDP the norm is a DTensor over the ranks' gradient shards.
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        if self.guard is not None:
            self.guard.check(self.step, "optim/grad_norm", grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.after_step()
        stats["optim/lr"] = self.scheduler.get_last_lr()[0]
        stats["optim/grad_norm"] = grad_norm
        return stats

    # ----------------------------------------------------------------------------------------------
    # Rollout hooks (called by the trainer for algorithms with needs_rollouts; see the module docstring)
    # ----------------------------------------------------------------------------------------------
    def rollout_policy(self, student_fn: PolicyFn, teacher_fn: PolicyFn) -> PolicyFn:
        """The policy the trainer's env rollouts sample from: the student, inside the teacher's top-p set.

        Args:
            student_fn: ``(tokens_BL, lengths_B) -> logits_BV`` of the student (no gradient).
            teacher_fn: ``(tokens_BL, lengths_B) -> logits_BV`` of the teacher at the same states; the trainer
                may be asked for it several times per state (it computes it once).

        Returns:
            ``policy_fn(tokens_BL, lengths_B) -> logits_BV``; with ``top_p < 1`` tokens outside the teacher's
            top-p set are at ``-inf`` (``top_p`` None or 1.0: the student unchanged).
        """
        p = self.top_p
        return student_fn if p is None or p >= 1.0 else top_p_restricted_policy(student_fn, teacher_fn, p)

    def before_rollout(self) -> None:
        """Called right before the trainer samples rollouts from :meth:`rollout_policy` (default: nothing)."""

    def after_rollout(self, indices: Sequence[int]) -> None:
        """Called with the buffer indices of the rollouts just added; passed on to the sampler."""
        self.sampler.rollouts_added(indices)

    def after_step(self) -> None:
        """Hook run after each optimiser step: moves the target network, if any."""
        if self.target is not None:
            self.target.update()

    def state_dict(self) -> dict:
        """Everything needed to resume: policy, optimiser, schedule, step and the target network, if any."""
        state = {
            "policy": self.policy.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
        }
        if self.target is not None:
            state["target"] = self.target.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict`."""
        self.policy.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        if self.target is not None:
            self.target.load_state_dict(state["target"])


def float_stats(values: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Detach scalar tensors into a ``{key: float}`` dict (keys keep their ``/`` namespaces)."""
    return {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in values.items()}
