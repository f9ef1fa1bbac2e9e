"""R2D2: recurrent double DQN from prioritized replay of sequences (Kapturowski et al. 2019).

Each replay item is one sequence cut by actors/sequence.py: T steps of one episode, padded
and masked after its end, with the LSTM state (h0, c0) the actor acted on its first step
from (the "stored state"). One update:

1. Unroll the online and the target network from the stored state over the T + 1
   observations. The first `burn_in` steps only bring the state from the (stale) stored
   one toward what the current network would carry: no gradient flows through them and
   they have no loss. A sequence that starts an episode (`fresh`) has the true, zero state
   already, so it is learned from its first step on (else an episode shorter than the
   burn-in would never teach the learner how it ended).
2. n-step double-Q targets inside the sequence, in the value-rescaled space:
       y_t = h( sum_{k<n'} g^k r_{t+k} + g^{n'} h^-1( Q_target(s_{t+n'}, argmax_a Q_online(s_{t+n'}, a)) ) )
   with n' = min(n, L - t) for a sequence of L real steps, and no bootstrap (discount 0)
   where the episode terminated at its last step. h(x) = sign(x)(sqrt(|x| + 1) - 1) + eps x
   squashes the returns so one learning rate fits small and large values alike.
3. Loss: the importance-weighted squared TD error, averaged over the learned steps.
4. Priority of each sequence: eta * max + (1 - eta) * mean of |TD| over its learned steps
   (eta = 0.9): the mean alone would dilute one surprising step in a long sequence.
5. The target network is a periodic copy (learner.tau = 1 every target_update_period).

The actors price new sequences with the same targets in numpy (actors/explore.py
`sequence_priorities`). An `Algorithm` (learner/algorithms/base.py); `build` at the end is
its registry entry.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn

from canopy.config import LearnerConfig
from canopy.envs import EnvSpec
from canopy.errors import UserError
from canopy.learner import network
from canopy.learner.algorithms.base import (
    Built,
    OnlineTarget,
    Sequences,
    Stats,
    adam,
    polyak,
)

PRIORITY_ETA = 0.9  # the paper's mix of max and mean |TD| in a sequence's priority
RESCALE_EPS = 1e-3  # epsilon of the value rescaling h


def rescale(x: torch.Tensor, eps: float = RESCALE_EPS) -> torch.Tensor:
    """h(x) = sign(x) (sqrt(|x| + 1) - 1) + eps x."""
    return torch.sign(x) * (torch.sqrt(x.abs() + 1) - 1) + eps * x


def unrescale(x: torch.Tensor, eps: float = RESCALE_EPS) -> torch.Tensor:
    """h^-1(x) = sign(x) (((sqrt(1 + 4 eps (|x| + 1 + eps)) - 1) / (2 eps))^2 - 1)."""
    root = (torch.sqrt(1 + 4 * eps * (x.abs() + 1 + eps)) - 1) / (2 * eps)
    return torch.sign(x) * (root * root - 1)


def learned_steps(mask: torch.Tensor, fresh: torch.Tensor, burn_in: int) -> torch.Tensor:
    """[B, T] 1 on the steps the loss sees: real steps past the burn-in (all real steps of a
    sequence that starts an episode)."""
    after = torch.arange(mask.shape[1], device=mask.device)[None, :] >= burn_in
    return mask * (after | (fresh[:, None] > 0)).to(mask.dtype)


def targets(
    q_online: torch.Tensor, q_target: torch.Tensor, batch: Sequences, n_step: int, gamma: float
) -> torch.Tensor:
    """[B, T] n-step double-Q targets y_t in the rescaled space (q_* [B, T + 1, A], no grad)."""
    action, reward = batch.action, batch.reward
    b, t = action.shape
    length = batch.mask.sum(dim=1).long()[:, None]  # L real steps
    steps = torch.arange(t, device=action.device)[None, :]
    boot = torch.minimum(steps + n_step, length)  # the step each target bootstraps from
    # Rewards after the L real steps are padding zeros, so the sum stops at the episode's end.
    padded = nn.functional.pad(reward, (0, n_step))
    returns = sum(gamma**j * padded[:, j : j + t] for j in range(n_step))
    ended = batch.terminated.amax(dim=1, keepdim=True) > 0  # terminated at its last real step
    discount = torch.where(
        (boot == length) & ended, 0.0, gamma ** (boot - steps).clamp(min=0).to(reward.dtype)
    )
    rows = torch.arange(b, device=action.device)[:, None]
    best = q_online[rows, boot].argmax(dim=2, keepdim=True)  # double Q: online picks, target values
    value = q_target[rows, boot].gather(2, best).squeeze(2)
    return rescale(returns + discount * unrescale(value))


def priority_mix(td: torch.Tensor, learned: torch.Tensor, eta: float = PRIORITY_ETA) -> torch.Tensor:
    """[B] eta * max + (1 - eta) * mean of |td| over each sequence's learned steps."""
    err = td.abs() * learned
    mean = err.sum(dim=1) / learned.sum(dim=1).clamp(min=1)
    return eta * err.amax(dim=1) + (1 - eta) * mean


class R2D2(OnlineTarget):
    """Example:
    algo = R2D2(LSTMQNetwork(2, 2, [64, 64]), cfg.learner)
    stats = algo.update(sequences)  # {'loss': tensor, 'q_mean': tensor}
    """

    models = 1
    report_every = 20

    def __init__(self, online: network.LSTMQNetwork, cfg: LearnerConfig):
        self.cfg = cfg
        self.online = online
        self.target = copy.deepcopy(online).requires_grad_(False)
        self.optimizer = adam(online.parameters(), lr=cfg.lr, eps=cfg.adam_eps)
        self.updates = 0
        self.last_priorities: torch.Tensor | None = None
        self.grad_sync: Callable[[Iterable[nn.Parameter]], None] | None = None

    def export(self) -> dict[str, np.ndarray]:
        """The online network's arrays, as actors act with them (arch `lstm_q`)."""
        return self.online.export()

    def unroll_online(self, batch: Sequences) -> torch.Tensor:
        """Q-values [B, T + 1, A] of the online net from the stored state. The burn-in steps
        of a sequence that does not start an episode pass no gradient: the state leaving them
        is detached there (their Q-values have no loss either, `learned_steps`)."""
        burn = self.cfg.burn_in
        if burn == 0:
            return self.online(batch.obs, (batch.h0, batch.c0))[0]
        q_burn, (h, c) = self.online(batch.obs[:, :burn], (batch.h0, batch.c0))
        keep = batch.fresh[:, None] > 0
        h, c = torch.where(keep, h, h.detach()), torch.where(keep, c, c.detach())
        q_rest, _ = self.online(batch.obs[:, burn:], (h, c))
        return torch.cat([q_burn, q_rest], dim=1)

    def loss(self, batch: Sequences) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, Q(s_t, a_t), TD errors, learned steps) of a batch; the last three [B, T]."""
        q_all = self.unroll_online(batch)
        with torch.no_grad():
            q_tgt, _ = self.target(batch.obs, (batch.h0, batch.c0))
            y = targets(q_all.detach(), q_tgt, batch, self.cfg.n_step, self.cfg.gamma)
        q = q_all[:, :-1].gather(2, batch.action.unsqueeze(2)).squeeze(2)
        td = y - q
        learned = learned_steps(batch.mask, batch.fresh, self.cfg.burn_in)
        per_seq = (td.pow(2) * learned).sum(dim=1) / learned.sum(dim=1).clamp(min=1)
        weight = torch.ones_like(per_seq) if batch.weight is None else batch.weight
        return 0.5 * (weight * per_seq).mean(), q, td, learned

    def update(self, batch: Sequences) -> Stats:
        """One training step on a batch of sequences."""
        loss, q, td, learned = self.loss(batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_sync is not None:
            self.grad_sync(self.online.parameters())
        nn.utils.clip_grad_norm_(self.online.parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        self.updates += 1
        if self.updates % self.cfg.target_update_period == 0:
            polyak(self.target, self.online, self.cfg.tau)
        self.last_priorities = priority_mix(td.detach(), learned)
        q_mean = (unrescale(q.detach()) * learned).sum() / learned.sum().clamp(min=1)
        return {"loss": loss.detach(), "q_mean": q_mean}

    def priorities(self) -> list[torch.Tensor] | None:
        """Each sampled sequence's new priority (`priority_mix` of its last |TD| errors)."""
        return None if self.last_priorities is None else [self.last_priorities]


def build(spec: EnvSpec, cfg: LearnerConfig, device: torch.device) -> Built:
    """An R2D2 for a Discrete env on `device`."""
    if not spec.discrete:
        raise UserError('r2d2 needs Discrete actions: for Box actions set learner.algorithm = "sac" or "td3"')
    net, arch = network.build_recurrent(spec.obs_shape, spec.obs_dtype, spec.actions, cfg.hidden)
    return Built(R2D2(net.to(device), cfg), arch)
