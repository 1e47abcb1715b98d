"""Soft Q-learning with Q = the student's logits on the teacher's top-p MDP and a teacher-derived reward.

    L(theta) = E_D[ ( Q_theta(s, a) - (r(s, a) + gamma * V_p^target(s')) )^2 ],
    V_p^target(s') = log sum_{a' in A_p(s')} exp Q_target(s', a')   (0 after EOS)

Default reward r(s, a) = log pi*(a | s) (from the teacher cache): with gamma = 1 and p = 1 its soft-optimal
Q is exactly the teacher's log-probabilities, so the student's softmax recovers the teacher. ``reward =
"sqil"`` gives SQIL's reward (1 on teacher transitions, 0 on the learner's own), which needs the learner's
rollouts (Reddy et al. 2020, arXiv 1905.11108). With it, a response that ends with EOS enters an absorbing state
that keeps its transition's reward forever (value ``r / (1 - gamma)``, as in SQIL's and DAC's treatment of
absorbing states) instead of the value 0: with 0, ending a teacher response would be worth 1 against
``1 + gamma * V(s') ~ 1 / (1 - gamma)`` for any continuation, and the student learns never to emit EOS. The
paper's online SQIL uses the full vocabulary (``top_p = 1``). The target network is a Polyak-averaged copy of the student. ``top_p = 1`` means no restriction
(full vocabulary).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from algorithms.base import AlgoConfig, Algorithm, float_stats
from tokenrl.core.options import PROBABILITY, UNIT_INTERVAL, field_problems
from tokenrl.core.backup import eos_steps, gather_action, next_state_values, state_values, td_target
from tokenrl.core.distributions import masked_mean, upcast
from tokenrl.core.target import TargetNetwork
from tokenrl.data.buffer import Batch
from tokenrl.lm.policy import CandidateQ, CausalLMPolicy

REWARD_CHOICES = ("teacher_logprob", "sqil")


@dataclass
class SoftQConfig(AlgoConfig):
    """Soft Q-learning settings."""

    top_p: float = 0.8  # action set = teacher's top-p set; 1.0 = full vocabulary
    gamma: float = 0.99  # discount
    reward: str = "teacher_logprob"  # teacher_logprob: r = log pi*(a|s); sqil: 1 on teacher data, 0 on rollouts
    target_update_rate: float = 0.01  # Polyak rate of the target network (1.0 = copy every step)
    sparse: bool = True  # gather candidate rows of the output embedding instead of dense logits

    def problems(self) -> list[str]:
        """The optimiser's problems plus the ranges, the reward choice and SQIL's need of gamma < 1."""
        ranges = {"top_p": PROBABILITY, "gamma": UNIT_INTERVAL, "target_update_rate": PROBABILITY}
        found = super().problems() + field_problems(self, "algo", ranges, {"reward": REWARD_CHOICES})
        if self.reward == "sqil" and self.gamma >= 1.0:
            found.append(f"algo.gamma={self.gamma} with algo.reward='sqil': needs gamma < 1 (the absorbing state after "
                         "EOS is worth 1 / (1 - gamma)); set algo.gamma=0.99")
        return found

    def reads_cached_sets(self) -> bool:
        """SQIL's reward is not the teacher's: at ``top_p = 1`` (the whole vocabulary) nothing reads the cache."""
        return not (self.reward == "sqil" and self.top_p >= 1.0)


def soft_q_loss(
    q_sa_BT: torch.Tensor, reward_BT: torch.Tensor, v_next_BT: torch.Tensor, mask_BT: torch.Tensor, gamma: float
) -> torch.Tensor:
    """Mean squared soft-TD error over the valid transitions (``v_next_BT`` is treated as a constant)."""
    target_BT = td_target(reward_BT, v_next_BT.detach(), gamma)
    return masked_mean((q_sa_BT - target_BT).square(), mask_BT)


@dataclass
class SoftTDTerms:
    """What a soft TD loss needs from the student and its target network on one batch.

    Attributes:
        cq: the student's Q on each state's action set.
        q_sa_BT: ``[B, T]`` Q of the taken action (at least float32; 0 where it is outside the set).
        v_BS: ``[B, S]`` target soft values of the states (0 on an empty set), without gradient.
        v_next_BT: ``[B, T]`` target value of each next state, terminal masking applied.
        state_ok_BS: ``[B, S]`` states with a non-empty action set.
    """

    cq: CandidateQ
    q_sa_BT: torch.Tensor
    v_BS: torch.Tensor
    v_next_BT: torch.Tensor
    state_ok_BS: torch.Tensor


def soft_td_terms(
    policy: CausalLMPolicy, target: TargetNetwork, batch: Batch, top_p: float, sparse: bool
) -> SoftTDTerms:
    """Student Q of the taken actions and the target network's soft values of the next states."""
    cq = policy.candidate_q(batch, top_p, sparse=sparse)
    with torch.no_grad():
        target.net.eval()
        tq = target.net.candidate_q(batch, top_p, sparse=sparse)
        v_BS = state_values(upcast(tq.logits_BSK), tq.mask_BSK)
        v_next_BT = next_state_values(v_BS, batch.lengths_B, batch.terminated_B)
    q_sa_BT = gather_action(upcast(cq.logits_BSK), cq.action_slot_BT)
    return SoftTDTerms(cq, q_sa_BT, v_BS, v_next_BT, tq.mask_BSK.any(-1))


class SoftQ(Algorithm):
    """Soft Q-learning with a Polyak target network."""

    name = "soft_q"
    uses_target_network = True

    @property
    def needs_rollouts(self) -> bool:
        """SQIL's reward is defined on the learner's own transitions too (reward 0)."""
        return self.config.reward == "sqil"

    def compute_loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.config
        td = soft_td_terms(self.policy, self.target, batch, cfg.top_p, cfg.sparse)
        q_dtype = td.q_sa_BT.dtype
        if cfg.reward == "teacher_logprob":
            reward_BT = batch.action_logprob_BT.to(q_dtype)
            known_BT = torch.isfinite(reward_BT)
            reward_BT = torch.where(known_BT, reward_BT, torch.zeros_like(reward_BT))
        else:
            reward_BT = batch.is_expert_B[:, None].to(q_dtype).expand_as(batch.action_mask_BT)
            known_BT = torch.ones_like(batch.action_mask_BT)
        v_next_BT = td.v_next_BT
        if cfg.reward == "sqil":
            # The EOS step of a terminated response leads to SQIL's absorbing state (module docstring).
            eos_BT = eos_steps(batch.lengths_B, batch.terminated_B, reward_BT.shape[1])
            v_next_BT = torch.where(eos_BT, reward_BT / (1.0 - cfg.gamma), v_next_BT)
        in_set_BT = td.cq.action_in_set_BT & known_BT
        loss = soft_q_loss(td.q_sa_BT, reward_BT, v_next_BT, in_set_BT, cfg.gamma)
        return loss, float_stats(
            {
                "loss/total": loss,
                "loss/td": loss,
                "q/expert_mean": masked_mean(td.q_sa_BT, in_set_BT),
                "v/target_mean": masked_mean(td.v_BS, td.state_ok_BS),
                "reward/mean": masked_mean(reward_BT, in_set_BT),
                "top_p/set_size": masked_mean(td.cq.mask_BSK.sum(-1).float(), td.state_ok_BS),
                "top_p/expert_outside_frac": masked_mean((~in_set_BT).float(), batch.action_mask_BT),
            }
        )
