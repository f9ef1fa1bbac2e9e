"""Q-networks, feed-forward and recurrent. Parameter names are part of the actor contract
(see actors/policy.py)."""

from __future__ import annotations

import itertools

import numpy as np
import torch
from torch import nn

from canopy.arch import LSTM_Q, MLP, NATURE_CNN
from canopy.errors import UserError

ARCH = MLP
CNN_ARCH = NATURE_CNN


class QNetwork(nn.Module):
    """MLP from a flat observation to one Q-value per action, optionally dueling.

    Example:
        net = QNetwork(obs_size=4, n_actions=2, hidden=[128, 128])
        q = net(torch.zeros(32, 4))  # [32, 2]

    Dueling (Wang et al. 2016): the last hidden layer feeds a state value V(s) and
    advantages A(s, a), combined as Q = V + A - mean_a A. Both heads are linear in the
    same features h, so Q is too: Q_a = (w_V + W_A[a] - mean_b W_A[b]) . h + (b_V + b_A[a]
    - mean_b b_A[b]). `export` folds the heads into that one linear layer, so actors run
    a dueling network as the plain `mlp` they know, with exactly the learner's Q-values.
    """

    def __init__(
        self,
        obs_size: int,
        n_actions: int,
        hidden: list[int],
        dueling: bool = False,
        layer_norm: bool = False,
    ):
        super().__init__()
        self.dueling = dueling
        sizes = [obs_size, *hidden] if dueling else [obs_size, *hidden, n_actions]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(sizes))
        # Layer normalization after every hidden layer (before its ReLU): it bounds the
        # features the Q-values are linear in, which keeps bootstrapped targets from
        # feeding their own growth; the Q-values themselves stay unnormalised.
        self.norms = nn.ModuleList(nn.LayerNorm(h) for h in hidden) if layer_norm else None
        if dueling:
            self.value = nn.Linear(sizes[-1], 1)
            self.advantage = nn.Linear(sizes[-1], n_actions)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """Q-values [batch, actions] of flattened observations."""
        x = obs.flatten(1).float()
        hidden = self.layers if self.dueling else self.layers[:-1]
        for i, layer in enumerate(hidden):
            x = layer(x)
            if self.norms is not None:
                x = self.norms[i](x)
            x = torch.relu(x)
        if not self.dueling:
            return self.layers[-1](x)
        a = self.advantage(x)
        # Subtracting the mean advantage makes V and A identifiable (any constant could
        # otherwise move between them) without changing which action is best.
        return self.value(x) + a - a.mean(dim=1, keepdim=True)

    def export(self) -> dict[str, np.ndarray]:
        """Weights as named float32 arrays in layer order, for publishing to actors."""
        arrays = {}
        for i, layer in enumerate(self.layers):
            arrays[f"layers.{i}.weight"] = _np(layer.weight)
            arrays[f"layers.{i}.bias"] = _np(layer.bias)
            if self.norms is not None and i < len(self.norms):
                arrays[f"layers.{i}.norm_weight"] = _np(self.norms[i].weight)
                arrays[f"layers.{i}.norm_bias"] = _np(self.norms[i].bias)
        if self.dueling:
            w_a, b_a = _np(self.advantage.weight), _np(self.advantage.bias)
            n = len(self.layers)
            arrays[f"layers.{n}.weight"] = _np(self.value.weight) + w_a - w_a.mean(axis=0, keepdims=True)
            arrays[f"layers.{n}.bias"] = _np(self.value.bias) + b_a - b_a.mean()
        return arrays


class LSTMQNetwork(nn.Module):
    """r2d2's recurrent Q-network (arch `lstm_q`): linear layers with ReLU on the flat
    observation, one LSTM layer of `hidden[-1]` units, and a linear head to one Q-value per action.

    Example:
        net = LSTMQNetwork(obs_size=2, n_actions=2, hidden=[64, 64])
        q, (h, c) = net(torch.zeros(32, 80, 2), net.zero_state(32))  # q: [32, 80, 2]

    The state (h, c) is carried from step to step; an actor zeroes it where an episode starts
    (actors/policy.py `LSTMQPolicy`, the same maths in numpy), and the learner starts each
    replayed sequence from the state stored with it.
    """

    def __init__(self, obs_size: int, n_actions: int, hidden: list[int]):
        super().__init__()
        sizes = [obs_size, *hidden[:-1]]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(sizes))
        self.lstm = nn.LSTM(sizes[-1], hidden[-1], batch_first=True)
        self.head = nn.Linear(hidden[-1], n_actions)

    @property
    def state_size(self) -> int:
        """Units of h (and of c)."""
        return self.lstm.hidden_size

    def zero_state(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The state at an episode's start: h = c = 0, each [batch, state_size]."""
        z = torch.zeros(batch, self.state_size, device=self.head.weight.device)
        return z, z.clone()

    def forward(
        self, obs: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Q-values [batch, time, actions] of observations [batch, time, ...] from `state`
        (h, c each [batch, state_size]), and the state after the last step."""
        x = obs.flatten(2).float()
        for layer in self.layers:
            x = torch.relu(layer(x))
        h, c = state
        out, (h, c) = self.lstm(x, (h.unsqueeze(0).contiguous(), c.unsqueeze(0).contiguous()))
        return self.head(out), (h.squeeze(0), c.squeeze(0))

    def export(self) -> dict[str, np.ndarray]:
        """Every parameter by its name (the `lstm_q` contract of canopy/arch.py), as float32."""
        return {k: _np(v) for k, v in self.state_dict().items()}


def build_recurrent(obs_shape: tuple[int, ...], obs_dtype: str, n_actions: int, hidden: list[int]):
    """r2d2's LSTM Q-network on the flattened observation, and its architecture name."""
    if obs_dtype == "uint8" and len(obs_shape) == 3:
        raise UserError(
            f"r2d2's lstm_q network takes flat observations, not {obs_dtype} frames {obs_shape}: "
            'use learner.algorithm = "dqn" for pixels'
        )
    return LSTMQNetwork(int(np.prod(obs_shape)), n_actions, hidden), LSTM_Q


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy()


class NatureCNN(nn.Module):
    """The Atari Q-network of Mnih et al. (2015): 3 conv layers and a 512-unit layer.

    Input: stacked frames, uint8 [batch, 4, 84, 84]; scaled to [0, 1] inside, so replay
    and the wire carry bytes, not floats (4x less memory and bandwidth).
    """

    def __init__(self, frames: int, n_actions: int):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(frames, 32, 8, stride=4),
            nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=1),
            nn.ReLU(),
            nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Linear(64 * 7 * 7, 512), nn.ReLU(), nn.Linear(512, n_actions))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """Q-values [batch, actions] of uint8 frame stacks."""
        return self.head(self.conv(obs.float() / 255.0))

    def export(self) -> dict[str, np.ndarray]:
        """Weights for actors/policy.py's NatureCNNPolicy (parameter names are the contract)."""
        return {k: _np(v) for k, v in self.state_dict().items()}


def build(
    obs_shape: tuple[int, ...],
    obs_dtype: str,
    n_actions: int,
    hidden: list[int],
    dueling: bool,
    layer_norm: bool = False,
):
    """The Q-network for an observation space and its architecture name for actors:
    the Nature CNN for stacked uint8 frames, an MLP on the flattened observation else."""
    if obs_dtype == "uint8" and len(obs_shape) == 3 and obs_shape[1:] == (84, 84):
        return NatureCNN(obs_shape[0], n_actions), CNN_ARCH
    net = QNetwork(int(np.prod(obs_shape)), n_actions, hidden, dueling=dueling, layer_norm=layer_norm)
    return net, ARCH
