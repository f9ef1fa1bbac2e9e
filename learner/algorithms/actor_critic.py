"""The networks and action distributions the on-policy learners share (ppo.py, impala.py).

Place in the data flow: replay `Unrolls` (learner/algorithms/base.py) -> `ActorCritic`: a
policy MLP and a separate value MLP -> log-probabilities, entropies and values for the
losses. `export` publishes the policy alone, as actors/policy.py runs it in numpy:
- Discrete: `categorical_mlp`, the MLP's outputs are the logits of a categorical;
- Box: `gaussian_mlp`, the outputs are the mean of a diagonal Gaussian whose log standard
  deviation `log_std` is one learned vector, the same in every state. Actors store the
  raw sample (its log-probability is what the learner corrects for) and step the env with
  it clipped to [-1, 1]; the evaluator, `canopy eval` and export act with the clipped mean.

Two separate networks rather than one torso with two heads: with no shared features the
value loss cannot pull the policy around, so its weight (`vf_coef`) is no balance to tune
(CleanRL's and SB3's default for these tasks).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn
from torch.distributions import Categorical, Distribution, Normal

from canopy.arch import CATEGORICAL_MLP, GAUSSIAN_MLP
from canopy.config import LearnerConfig
from canopy.envs import EnvSpec
from canopy.errors import UserError
from canopy.learner.algorithms.base import TrainingState, adam, load_torch_state, torch_state
from canopy.learner.network import QNetwork
from canopy.learner.overlap import GradSync


class ActorCritic(nn.Module):
    """Example:
    net = ActorCritic(obs_size=4, actions=2, hidden=[64, 64], discrete=True)
    dist = net.dist(obs)  # Categorical over 2 actions, one per row of obs
    v = net.value_of(obs)  # [rows]
    """

    def __init__(self, obs_size: int, actions: int, hidden: list[int], discrete: bool):
        super().__init__()
        self.discrete = discrete
        self.policy = QNetwork(obs_size, actions, hidden)  # parameters named as actors read them
        self.value = QNetwork(obs_size, 1, hidden)
        # Box: exp(0) = 1, a wide start over actions in [-1, 1], which the policy gradient narrows.
        self.log_std = None if discrete else nn.Parameter(torch.zeros(actions))
        # Orthogonal weights (Saxe et al.), gain sqrt(2) under ReLU; a near-zero last policy
        # layer starts every action equally likely (or the mean at 0), the usual PPO start.
        for net, last_gain in ((self.policy, 0.01), (self.value, 1.0)):
            for i, layer in enumerate(net.layers):
                last = i == len(net.layers) - 1
                nn.init.orthogonal_(layer.weight, last_gain if last else math.sqrt(2))
                nn.init.zeros_(layer.bias)

    @property
    def arch(self) -> str:
        """The architecture name published versions carry (canopy/arch.py)."""
        return CATEGORICAL_MLP if self.discrete else GAUSSIAN_MLP

    def dist(self, obs: torch.Tensor) -> Distribution:
        """The action distribution in each state of a batch [N, ...] of observations."""
        out = self.policy(obs)
        # No argument validation: it checks every value of every minibatch, a sizeable share
        # of a small network's step, and these tensors come from the network itself.
        if self.discrete:
            return Categorical(logits=out, validate_args=False)
        return Normal(out, self.log_std.exp().expand_as(out), validate_args=False)

    def log_prob(self, dist: Distribution, action: torch.Tensor) -> torch.Tensor:
        """log pi(a|s) per row: a Gaussian's density is the product over action dimensions."""
        logp = dist.log_prob(action)
        return logp if self.discrete else logp.sum(-1)

    def entropy(self, dist: Distribution) -> torch.Tensor:
        """The entropy of each row's distribution (summed over a Gaussian's dimensions)."""
        ent = dist.entropy()
        return ent if self.discrete else ent.sum(-1)

    def value_of(self, obs: torch.Tensor) -> torch.Tensor:
        """V(s) per row of a batch of observations."""
        return self.value(obs).squeeze(-1)

    def export(self) -> dict[str, np.ndarray]:
        """The policy's arrays for actors: its MLP, and `log_std` for a Gaussian."""
        arrays = self.policy.export()
        if self.log_std is not None:
            arrays["log_std"] = self.log_std.detach().to("cpu", torch.float32).numpy()
        return arrays


def steps(x: torch.Tensor) -> torch.Tensor:
    """[B, T, ...] -> [B * T, ...]: every step of every unroll as one row."""
    return x.reshape(-1, *x.shape[2:])


def values_of(net: ActorCritic, obs: torch.Tensor) -> torch.Tensor:
    """V of every observation of the unrolls, [B, T + 1] (the last column: the bootstrap)."""
    return net.value_of(steps(obs)).view(obs.shape[0], obs.shape[1])


def normalized(x: torch.Tensor, mask: torch.Tensor, center: bool = True) -> torch.Tensor:
    """`x` scaled to std 1 over the real steps (mask 1) of a batch, and with `center`
    shifted to mean 0."""
    n = mask.sum().clamp(min=1)
    mean = (x * mask).sum() / n
    std = (((x - mean) ** 2 * mask).sum() / n).sqrt()
    return ((x - mean) if center else x) / (std + 1e-8) * mask


def build_net(name: str, spec: EnvSpec, cfg: LearnerConfig, device: torch.device) -> ActorCritic:
    """The actor-critic of on-policy algorithm `name` for an env, on `device`; a one-line
    UserError for what it cannot learn."""
    if len(spec.obs_shape) == 3 and spec.obs_dtype == "uint8":
        raise UserError(f"{name} trains on flat observations, not {spec.obs_shape} frames: use dqn for Atari")
    if cfg.models > 1:
        raise UserError(f"learner.models > 1 trains dqn populations only: not {name}; set learner.models = 1")
    net = ActorCritic(int(np.prod(spec.obs_shape)), spec.actions, cfg.hidden, spec.discrete)
    return net.to(device)


class OnPolicyLearner:
    """What ppo.py and impala.py share besides their `update`: one actor-critic and one Adam,
    nothing to prioritize, the policy as the published arrays, and the checkpoint state."""

    models = 1  # one batch of unrolls per update

    def __init__(self, net: ActorCritic, cfg: LearnerConfig):
        self.cfg = cfg
        self.online = net
        self.optimizer = adam(net.parameters(), lr=cfg.lr, eps=1e-5)  # the usual epsilon of both
        self.updates = 0
        # A data-parallel learner group averages the gradients here (see dqn.py).
        self.grad_sync: Callable[[Iterable[nn.Parameter]], None] | None = None

    def priorities(self) -> list[torch.Tensor] | None:
        """None: queue items are read once, there is nothing to prioritize."""
        return None

    def export(self) -> dict[str, np.ndarray]:
        """The policy's arrays (categorical_mlp or gaussian_mlp); the value net stays here."""
        return self.online.export()

    def state(self) -> TrainingState:
        """Both networks (and log_std), Adam, and the update count (schedules follow it)."""
        return torch_state(self.updates, {"online": self.online}, self.optimizer)

    def restore(self, state: TrainingState) -> None:
        """Put back what `state` took, the update count included."""
        load_torch_state(state, {"online": self.online}, self.optimizer)
        self.updates = state.updates

    def join_group(self) -> None:
        """From the next update on, gradients are averaged over the learner group."""
        self.grad_sync = GradSync()
