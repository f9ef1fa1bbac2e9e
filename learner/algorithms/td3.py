"""TD3 (Fujimoto et al. 2018): an actor-critic for continuous actions, learning from replay.

Actions live in [-1, 1]^d everywhere canopy stores or sends them; actors scale them to
the env's Box bounds when they step. Replay items are n-step transitions from
actors/adder.py, exactly as for DQN, so the critic's target is
    y = R + discount * min(Q1', Q2')(s', clip(pi'(s') + clip(eps, -c, c), -1, 1))
with eps ~ N(0, target_noise). The three fixes over DDPG, each at its line below: twin
critics (the min curbs overestimation), target policy smoothing (the noise), and a
delayed, less frequent actor update.

An `Algorithm` (learner/algorithms/base.py); `build` at the end is its registry entry.
Its checkpoint state: `online` and `target` hold every network, `optimizer` every
parameter (one Adam, a param group per network), `updates` counts critic updates.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn

from canopy.arch import TANH_MLP
from canopy.config import LearnerConfig
from canopy.envs import EnvSpec
from canopy.errors import UserError
from canopy.learner.algorithms.base import (
    Batch,
    Built,
    OnlineTarget,
    Stats,
    adam,
    polyak,
)

ARCH = TANH_MLP  # actors/policy.py: an mlp whose output goes through tanh


def mlp(sizes: list[int]) -> nn.ModuleList:
    """Linear layers between consecutive sizes (the activations are the caller's)."""
    return nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(sizes))


class Actor(nn.Module):
    """Deterministic policy pi(s) in [-1, 1]^d; parameter names match the actors' mlp."""

    def __init__(self, obs_size: int, act_size: int, hidden: list[int]):
        super().__init__()
        self.layers = mlp([obs_size, *hidden, act_size])

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """Actions for a batch of observations: ReLU hidden layers, tanh output."""
        x = obs.flatten(1).float()
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))
        return torch.tanh(self.layers[-1](x))

    def export(self) -> dict[str, np.ndarray]:
        """Weights as named float32 arrays, as actors/policy.py's `tanh_mlp` reads them."""
        return {k: v.detach().to("cpu", torch.float32).numpy() for k, v in self.state_dict().items()}


class TwinCritic(nn.Module):
    """Two independent Q(s, a) networks evaluated together."""

    def __init__(self, obs_size: int, act_size: int, hidden: list[int]):
        super().__init__()
        self.q1 = mlp([obs_size + act_size, *hidden, 1])
        self.q2 = mlp([obs_size + act_size, *hidden, 1])

    @staticmethod
    def _run(layers: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        for layer in layers[:-1]:
            x = torch.relu(layer(x))
        return layers[-1](x).squeeze(1)

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q1, Q2) of each (observation, action) pair, one value per item."""
        x = torch.cat([obs.flatten(1).float(), action.float()], dim=1)
        return self._run(self.q1, x), self._run(self.q2, x)


class TD3(OnlineTarget):
    """Example:
    algo = TD3(obs_size=3, act_size=1, cfg=cfg.learner)
    stats = algo.update(batch)  # {'loss': critic loss, 'q_mean': ...} as tensors
    actor_arrays = algo.export()  # what actors act with
    """

    models = 1  # one replay batch per update
    report_every = 50  # updates between stats reports

    def __init__(self, obs_size: int, act_size: int, cfg: LearnerConfig):
        self.cfg = cfg
        self.online = nn.ModuleDict(
            {
                "actor": Actor(obs_size, act_size, cfg.hidden),
                "critic": TwinCritic(obs_size, act_size, cfg.hidden),
            }
        )
        self.target = copy.deepcopy(self.online).requires_grad_(False)
        self.optimizer = adam(
            [
                {"params": self.online["actor"].parameters(), "lr": cfg.lr},
                {"params": self.online["critic"].parameters(), "lr": cfg.lr},
            ],
            lr=cfg.lr,
        )
        self.updates = 0
        self.last_td_error: torch.Tensor | None = None
        self.grad_sync: Callable[[Iterable[nn.Parameter]], None] | None = None  # see dqn.py

    def export(self) -> dict[str, np.ndarray]:
        """The online actor's arrays: actors need the policy, never the critics."""
        return self.online["actor"].export()

    def update(self, batch: Batch) -> Stats:
        """One critic step, and every `policy_delay` updates an actor step and the target update."""
        actor, critic = self.online["actor"], self.online["critic"]
        cfg = self.cfg
        with torch.no_grad():
            # Target policy smoothing: a noisy target action, so the critic cannot exploit
            # a narrow peak of its own estimate.
            next_action = self.target["actor"](batch.next_obs)
            noise = (torch.randn_like(next_action) * cfg.target_noise).clamp(-cfg.noise_clip, cfg.noise_clip)
            next_action = (next_action + noise).clamp(-1.0, 1.0)
            q1_next, q2_next = self.target["critic"](batch.next_obs, next_action)
            # Clipped double Q: the smaller of the two estimates.
            target = batch.reward + batch.discount * torch.min(q1_next, q2_next)
        q1, q2 = critic(batch.obs, batch.action)
        per_item = (q1 - target) ** 2 + (q2 - target) ** 2
        loss = per_item.mean() if batch.weight is None else (batch.weight * per_item).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_sync is not None:
            self.grad_sync(critic.parameters())
        nn.utils.clip_grad_norm_(critic.parameters(), cfg.max_grad_norm)
        self.optimizer.step()  # the actor's grads are None: Adam leaves it alone
        self.updates += 1
        self.last_td_error = (target - q1).detach().abs()

        # Delayed policy update: the actor follows a critic that has settled a little.
        if self.updates % cfg.policy_delay == 0:
            actor_params = list(actor.parameters())
            actor_loss = -critic(batch.obs, actor(batch.obs))[0].mean()
            self.optimizer.zero_grad(set_to_none=True)
            # Gradients into the actor only: the critic's stay None and are not stepped.
            actor_loss.backward(inputs=actor_params)
            if self.grad_sync is not None:
                self.grad_sync(actor_params)
            nn.utils.clip_grad_norm_(actor_params, cfg.max_grad_norm)
            self.optimizer.step()
            self._soft_update()
        # 0-d tensors, as DQN's: no host sync here (base.py `Algorithm.update`).
        return {"loss": loss.detach(), "q_mean": q1.detach().mean()}

    def _soft_update(self) -> None:
        # Polyak averaging: targets trail the online networks smoothly.
        polyak(self.target, self.online, self.cfg.tau)

    def priorities(self) -> list[torch.Tensor] | None:
        """|TD error| of the first critic on the last update's items: their new priorities."""
        return None if self.last_td_error is None else [self.last_td_error]


def build(spec: EnvSpec, cfg: LearnerConfig, device: torch.device) -> Built:
    """A TD3 for a Box env on `device`."""
    if cfg.models > 1:
        raise UserError("learner.models > 1 trains dqn populations only: this env has Box actions (td3)")
    if spec.discrete:
        raise UserError('this env has Discrete actions: set learner.algorithm = "dqn"')
    algo = TD3(math.prod(spec.obs_shape), spec.actions, cfg)
    algo.online.to(device)
    algo.target.to(device)
    return Built(algo, ARCH)
