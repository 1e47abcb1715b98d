"""Target networks: a frozen copy of an online network that follows it by Polyak averaging."""

from __future__ import annotations

import copy

import torch


@torch.no_grad()
def polyak_update(target: torch.nn.Module, online: torch.nn.Module, rate: float) -> None:
    """Target-network update ``theta_target <- (1 - rate) theta_target + rate theta_online`` (1: hard copy)."""
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"target_update_rate must be in (0, 1], got {rate}")
    for p_t, p_o in zip(target.parameters(), online.parameters()):
        p_t.lerp_(p_o.detach(), rate)
    for b_t, b_o in zip(target.buffers(), online.buffers()):
        b_t.copy_(b_o)


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
        self.net = copy.deepcopy(online).requires_grad_(False)

    def update(self) -> None:
        """One Polyak step towards the online network."""
        polyak_update(self.net, self.online, self.update_rate)

    def state_dict(self) -> dict:
        """The target copy's parameters and buffers."""
        return self.net.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Restore the target copy from :meth:`state_dict`."""
        self.net.load_state_dict(state)
