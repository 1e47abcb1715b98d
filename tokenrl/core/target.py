"""Target networks: a frozen copy of an online network that follows it by Polyak averaging.

The averaging is PyTorch's own (:class:`torch.optim.swa_utils.AveragedModel` with
:func:`~torch.optim.swa_utils.get_ema_multi_avg_fn`): ``theta_target <- (1 - rate) theta_target + rate
theta_online`` on the parameters, the buffers copied. ``tests/test_backup.py`` checks the target weights after
several updates against the formula, step by step.
"""

from __future__ import annotations

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class TargetNetwork:
    """A frozen copy of an online network, moved towards it by Polyak averaging after every step.

    Args:
        online: the network being trained (copied now; later updates read its current parameters).
        update_rate: Polyak rate in (0, 1]; 1.0 copies the online network at every :meth:`update`.

    Attributes:
        net: the target copy (no gradients; call it like the online network, in eval mode).
    """

    def __init__(self, online: torch.nn.Module, update_rate: float):
        if not 0.0 < update_rate <= 1.0:
            raise ValueError(f"target_update_rate must be in (0, 1], got {update_rate}")
        self.online = online
        self.update_rate = update_rate
        # EMA decay = 1 - rate; the buffers (RoPE frequencies, ...) are copied, not averaged.
        self.averaged = AveragedModel(online, multi_avg_fn=get_ema_multi_avg_fn(1.0 - update_rate), use_buffers=False)
        # AveragedModel's first update copies the online network instead of averaging: spend it now, on the copy
        # it already holds, so that every update() is a Polyak step.
        self.averaged.update_parameters(online)
        self.net = self.averaged.module.requires_grad_(False)

    def update(self) -> None:
        """One Polyak step towards the online network."""
        self.averaged.update_parameters(self.online)

    def state_dict(self) -> dict:
        """The target copy's parameters and buffers (the online network's keys)."""
        return self.net.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Restore the target copy from :meth:`state_dict`."""
        self.net.load_state_dict(state)
