"""SAC (Haarnoja et al. 2018, with automatic entropy tuning): a stochastic actor-critic for
continuous actions, learning from replay.

Like td3.py, actions live in [-1, 1]^d wherever canopy stores or sends them, and replay
items are n-step transitions from actors/adder.py. The actor is a Gaussian squashed by
tanh: x = mean(s) + std(s) * eps, eps ~ N(0, I), a = tanh(x). It maximizes reward plus
alpha times its entropy; alpha itself is learned so that the entropy stays near a target
(-|A|, the paper's heuristic). One update:
    critic: y = R + discount * (min(Q1', Q2')(s', a') - alpha * log pi(a'|s')), a' ~ pi(s')
    actor:  minimize alpha * log pi(a|s) - min(Q1, Q2)(s, a), a ~ pi(s) reparameterized
    alpha:  minimize -log_alpha * (log pi(a|s) + target entropy), log pi held fixed
then the target critics move toward the online ones (Polyak). There is no target actor:
a' comes from the online actor, as in the paper's second version. With n-step returns the
entropy bonus enters once, at the bootstrap state (the intermediate rewards come from the
actor's replay without it), the usual approximation of an n-step soft backup.

Actors sample from the same policy in numpy (actors/policy.py `SquashedGaussianPolicy`):
the sample is the exploration, no extra noise; the evaluator and exports act with
tanh(mean).

An `Algorithm` (learner/algorithms/base.py); `build` at the end is its registry entry.
Its checkpoint state: `online` holds the actor, the twin critic and the temperature,
`target` the target critic, `optimizer` every parameter (one Adam, a param group each for
the actor, the critic and log_alpha), `updates` counts updates.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from canopy.arch import LOG_STD_MAX, LOG_STD_MIN, SQUASHED_GAUSSIAN_MLP
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
from canopy.learner.algorithms.td3 import TwinCritic, mlp

ARCH = SQUASHED_GAUSSIAN_MLP  # actors/policy.py: mean and log std from one mlp, then tanh
LOG_2 = math.log(2.0)
HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def squashed_log_prob(pre_tanh: torch.Tensor, eps: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """log pi(tanh(x)) for x = mean + std * eps ~ N(mean, std^2), summed over the action dims."""
    # log N(x; mean, std) written with eps = (x - mean) / std, which the sampler already has.
    gaussian = (-0.5 * eps.square() - log_std - HALF_LOG_2PI).sum(1)
    # Change of variables a = tanh(x): log pi(a) = log N(x) - sum log(1 - tanh(x)^2). In float32
    # 1 - tanh(x)^2 rounds to 0 beyond |x| ~ 9 (log: -inf); the identity
    # log(1 - tanh(x)^2) = 2 (log 2 - x - softplus(-2x)) is exact and finite for every x.
    return gaussian - (2.0 * (LOG_2 - pre_tanh - F.softplus(-2.0 * pre_tanh))).sum(1)


class SquashedGaussianActor(nn.Module):
    """pi(.|s): tanh of a diagonal Gaussian; parameter names match the actors' arrays."""

    def __init__(self, obs_size: int, act_size: int, hidden: list[int]):
        super().__init__()
        self.act_size = act_size
        self.layers = mlp([obs_size, *hidden, 2 * act_size])

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, log std) of the pre-tanh Gaussian, each [batch, d]; log std clamped."""
        x = obs.flatten(1).float()
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))
        out = self.layers[-1](x)
        mean, log_std = out[:, : self.act_size], out[:, self.act_size :]
        # A hard clamp, the same as the actors' numpy one (canopy/arch.py), so both sample
        # from the same distribution; it keeps std in [e^-5, e^2] early in training.
        return mean, log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)

    def sample(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(actions in [-1, 1]^d, their log-probabilities [batch]), reparameterized: the
        gradient flows through the actions into the mean and log std."""
        mean, log_std = self(obs)
        eps = torch.randn_like(mean)
        pre_tanh = mean + log_std.exp() * eps
        return torch.tanh(pre_tanh), squashed_log_prob(pre_tanh, eps, log_std)

    def greedy(self, obs: torch.Tensor) -> torch.Tensor:
        """The deterministic action tanh(mean): what the evaluator and exports act with."""
        return torch.tanh(self(obs)[0])

    def export(self) -> dict[str, np.ndarray]:
        """Weights as named float32 arrays, as actors/policy.py's `squashed_gaussian_mlp` reads them."""
        return {k: v.detach().to("cpu", torch.float32).numpy() for k, v in self.state_dict().items()}


class Greedy(nn.Module):
    """The actor's greedy action as a module's forward (what `canopy export` traces)."""

    def __init__(self, actor: SquashedGaussianActor):
        super().__init__()
        self.actor = actor

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """tanh(mean) for a batch of observations."""
        return self.actor.greedy(obs)


class Temperature(nn.Module):
    """The entropy weight alpha, learned as log alpha (positive by construction); starts at 1."""

    def __init__(self) -> None:
        super().__init__()
        self.log_alpha = nn.Parameter(torch.zeros(()))

    def forward(self) -> torch.Tensor:
        """alpha = exp(log_alpha), a 0-d tensor."""
        return self.log_alpha.exp()


class SAC(OnlineTarget):
    """Example:
    algo = SAC(obs_size=3, act_size=1, cfg=cfg.learner)
    stats = algo.update(batch)  # {'loss': critic loss, 'q_mean', 'actor_loss', 'alpha', 'entropy'}
    actor_arrays = algo.export()  # what actors sample from
    """

    models = 1  # one replay batch per update
    report_every = 50  # updates between stats reports

    def __init__(self, obs_size: int, act_size: int, cfg: LearnerConfig):
        self.cfg = cfg
        self.online = nn.ModuleDict(
            {
                "actor": SquashedGaussianActor(obs_size, act_size, cfg.hidden),
                "critic": TwinCritic(obs_size, act_size, cfg.hidden),
                "temperature": Temperature(),
            }
        )
        self.target = copy.deepcopy(self.online["critic"]).requires_grad_(False)
        self.target_entropy = -float(act_size)
        # One Adam, so the checkpoint's `torch_state` takes all of it; each step leaves the
        # groups whose grads are None alone (set_to_none below).
        self.optimizer = adam(
            [
                {"params": self.online["actor"].parameters(), "lr": cfg.lr},
                {"params": self.online["critic"].parameters(), "lr": cfg.lr},
                {"params": self.online["temperature"].parameters(), "lr": cfg.lr},
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
        """One critic step, one actor-and-temperature step, and the target update."""
        # alpha as it stands before this update, a constant in both losses below.
        alpha = self.online["temperature"]().detach()
        loss, q1 = self._critic_step(batch, alpha)
        actor_loss, logp = self._actor_step(batch, alpha)
        polyak(self.target, self.online["critic"], self.cfg.tau)
        self.updates += 1
        # 0-d tensors, as DQN's: no host sync here (base.py `Algorithm.update`).
        return {
            "loss": loss.detach(),
            "q_mean": q1.detach().mean(),
            "actor_loss": actor_loss.detach(),
            "alpha": alpha,
            "entropy": -logp.mean(),
        }

    def _critic_step(self, batch: Batch, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        actor, critic = self.online["actor"], self.online["critic"]
        with torch.no_grad():
            next_action, next_logp = actor.sample(batch.next_obs)
            q1_next, q2_next = self.target(batch.next_obs, next_action)
            # Soft Bellman backup: the smaller twin (curbs overestimation, as in TD3) plus the
            # entropy bonus -alpha log pi of the action the policy would take at s'.
            soft_value = torch.min(q1_next, q2_next) - alpha * next_logp
            target = batch.reward + batch.discount * soft_value
        q1, q2 = critic(batch.obs, batch.action)
        per_item = (q1 - target) ** 2 + (q2 - target) ** 2
        loss = per_item.mean() if batch.weight is None else (batch.weight * per_item).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_sync is not None:
            self.grad_sync(critic.parameters())
        nn.utils.clip_grad_norm_(critic.parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()  # actor and temperature grads are None: Adam leaves them alone
        self.last_td_error = (target - q1).detach().abs()
        return loss, q1

    def _actor_step(self, batch: Batch, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        actor, critic, temperature = self.online["actor"], self.online["critic"], self.online["temperature"]
        action, logp = actor.sample(batch.obs)  # reparameterized: d/d(actor) flows through action
        q1, q2 = critic(batch.obs, action)
        actor_loss = (alpha * logp - torch.min(q1, q2)).mean()
        # d/d(log_alpha) = -(log pi + target) = entropy - target: gradient descent lowers alpha
        # while the entropy is above its target and raises it while below.
        alpha_loss = -(temperature.log_alpha * (logp.detach() + self.target_entropy)).mean()
        # The two losses share no parameter (alpha is a constant in one, log pi in the other),
        # so one backward and one step serve both; the critic's grads stay None.
        params = [*actor.parameters(), temperature.log_alpha]
        self.optimizer.zero_grad(set_to_none=True)
        (actor_loss + alpha_loss).backward(inputs=params)
        if self.grad_sync is not None:
            self.grad_sync(params)
        nn.utils.clip_grad_norm_(params[:-1], self.cfg.max_grad_norm)  # the actor's; alpha unclipped
        self.optimizer.step()
        return actor_loss, logp.detach()

    def priorities(self) -> list[torch.Tensor] | None:
        """|TD error| of the first critic on the last update's items: their new priorities."""
        return None if self.last_td_error is None else [self.last_td_error]


def build(spec: EnvSpec, cfg: LearnerConfig, device: torch.device) -> Built:
    """A SAC for a Box env on `device`."""
    if cfg.models > 1:
        raise UserError("learner.models > 1 trains dqn populations only: set learner.models = 1 for sac")
    if spec.discrete:
        raise UserError('this env has Discrete actions: set learner.algorithm = "dqn" (sac is for Box)')
    algo = SAC(math.prod(spec.obs_shape), spec.actions, cfg)
    algo.online.to(device)
    algo.target.to(device)
    return Built(algo, ARCH)
