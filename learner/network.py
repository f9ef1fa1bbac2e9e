"""Q-networks. Parameter names are part of the actor contract (see actors/policy.py)."""

from __future__ import annotations

import itertools

import numpy as np
import torch
from torch import nn

ARCH = "mlp"


class QNetwork(nn.Module):
    """MLP from a flat observation to one Q-value per action.

    Example:
        net = QNetwork(obs_size=4, n_actions=2, hidden=[128, 128])
        q = net(torch.zeros(32, 4))  # [32, 2]
    """

    def __init__(self, obs_size: int, n_actions: int, hidden: list[int]):
        super().__init__()
        sizes = [obs_size, *hidden, n_actions]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(sizes))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        x = obs.flatten(1).float()
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))
        return self.layers[-1](x)

    def export(self) -> dict[str, np.ndarray]:
        """Weights as named float32 arrays in layer order, for publishing to actors."""
        return {k: v.detach().to("cpu", torch.float32).numpy() for k, v in self.state_dict().items()}
