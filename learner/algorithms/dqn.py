"""Double DQN with n-step returns and a target network, learning from replay.

Each replay item is already an n-step transition built by actors/adder.py:
    (s_t, a_t, R = sum_{k<n} g^k r_{t+k}, s_{t+n}, discount = g^n, or 0 if the episode
    terminated inside the window)
so the learner never needs to know about episode boundaries or truncation.

An `Algorithm` (learner/algorithms/base.py); `build` at the end is its registry entry.
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
    Batch,
    Built,
    OnlineTarget,
    Stats,
    adam,
    polyak,
)


class DQN(OnlineTarget):
    """Example:
    algo = DQN(QNetwork(4, 2, [128, 128]), cfg.learner)
    stats = algo.update(batch)  # {'loss': tensor, 'q_mean': tensor}
    """

    models = 1  # one replay batch per update
    report_every = 50  # updates between stats reports

    def __init__(self, online: nn.Module, cfg: LearnerConfig):
        self.cfg = cfg
        self.online = online
        self.target = copy.deepcopy(online).requires_grad_(False)
        # A large epsilon (Dopamine's choice) turns Adam into plain SGD once gradients are
        # small: a converged Q-network stops drifting instead of taking lr-sized steps on noise.
        self.optimizer = adam(online.parameters(), lr=cfg.lr, eps=cfg.adam_eps)
        # Linear annealing of the step size to lr_final over lr_anneal_updates, then constant:
        # late, small steps keep a policy that already balances from unlearning it.
        self.scheduler = None
        if cfg.lr_anneal_updates > 0 and cfg.lr > 0:
            final = min(1.0, cfg.lr_final / cfg.lr)  # a model_lr below lr_final stays constant
            self.scheduler = torch.optim.lr_scheduler.LinearLR(
                self.optimizer, 1.0, final, total_iters=cfg.lr_anneal_updates
            )
        self.updates = 0
        self.last_td_error: torch.Tensor | None = None
        # A data-parallel learner group (learner/overlap.py GradSync) averages the
        # gradients across ranks here; None for a learner that trains alone.
        self.grad_sync: Callable[[Iterable[nn.Parameter]], None] | None = None

    def export(self) -> dict[str, np.ndarray]:
        """The online network's arrays, as actors act with them."""
        return self.online.export()

    def update(self, batch: Batch) -> Stats:
        """One training step on `batch`: backward, the group's gradient average, then apply."""
        stats = self.backward(batch)
        if self.grad_sync is not None:
            # Average before clipping: every rank then clips and steps the same gradient.
            self.grad_sync(self.params())
        self.apply()
        return stats

    def params(self) -> Iterable[nn.Parameter]:
        """The parameters whose gradients `backward` fills (a learner group averages them)."""
        return self.online.parameters()

    def backward(self, batch: Batch) -> Stats:
        """The loss on `batch` and its gradients; `apply` then steps (update = both).

        Split in two so a learner group training several models (learner/algorithms/population.py)
        can average one model's gradients while it computes the next model's.
        """
        device = batch.obs.device.type
        # bfloat16 autocast on CUDA only: CPU matmuls gain nothing from it at these sizes.
        with torch.autocast(device, torch.bfloat16, enabled=self.cfg.bf16 and device == "cuda"):
            q_all = self.online(batch.obs)
            q = q_all.gather(1, batch.action.unsqueeze(1)).squeeze(1).float()

            # The target is a constant: gradients flow only through Q(s_t, a_t).
            with torch.no_grad():
                # Double Q: the online net picks the next action, the target net values it,
                # which removes the max-operator's upward bias of plain DQN.
                next_action = self.online(batch.next_obs).argmax(dim=1, keepdim=True)
                next_q = self.target(batch.next_obs).gather(1, next_action).squeeze(1).float()
                # discount is g^n, or 0 when the episode terminated (no bootstrap past the end).
                target = batch.reward + batch.discount * next_q

            # Huber loss keeps rare large TD errors from dominating a step.
            per_item = nn.functional.smooth_l1_loss(q, target, reduction="none")
            # Prioritized replay samples high-error items more often; the IS weights undo that
            # bias in the gradient (normalised by the largest weight, so they only shrink steps).
            loss = per_item.mean() if batch.weight is None else (batch.weight * per_item).mean()
        # Outside autocast, as torch advises: the backward ops take the forward ops' dtypes.
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.last_td_error = (target - q).detach().abs()  # new priorities, for prioritized replay
        # Tensors, not floats: `.item()` would wait for the GPU every update; the learner
        # reads them only when it reports (base.py `Algorithm.update`).
        return {"loss": loss.detach(), "q_mean": q.detach().mean()}

    def apply(self) -> None:
        """Clip and step the gradients `backward` left (averaged over the group by then)."""
        nn.utils.clip_grad_norm_(self.online.parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.updates += 1
        # Every period the target moves a fraction tau toward the online net (tau 1: a hard
        # copy). A slow-moving target keeps the regression from chasing its own latest errors.
        if self.updates % self.cfg.target_update_period == 0:
            polyak(self.target, self.online, self.cfg.tau)

    def priorities(self) -> list[torch.Tensor] | None:
        """|TD error| of the last update's items: their new replay priorities."""
        return None if self.last_td_error is None else [self.last_td_error]


def build(spec: EnvSpec, cfg: LearnerConfig, device: torch.device) -> Built:
    """A DQN for a Discrete env on `device` (learner/algorithms/population.py builds several of them)."""
    if not spec.discrete:
        raise UserError('this env has continuous (Box) actions: set learner.algorithm = "td3"')
    net, arch = network.build(
        spec.obs_shape, spec.obs_dtype, spec.actions, cfg.hidden, cfg.dueling, cfg.layer_norm
    )
    if cfg.compile:
        net.compile()  # in place: parameter names (checkpoints, actors) stay as they are
    return Built(DQN(net.to(device), cfg), arch)
