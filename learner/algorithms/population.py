"""Several DQN models trained together by one learner (group): `learner.models = M`.

Place in the data flow: M replay batches per update (one per model, from the shared
replay) -> `Population.update` -> `OverlapTrainer` (learner/overlap.py: in a data-parallel
group, model k's gradient all-reduce runs while model k+1's backward pass computes) -> one
published version holding every model's arrays under `m<k>/` -> actor i acts with model
i % M (actors/policy.py `member_arrays`), the evaluator judges each model.

Why one version for the whole population rather than one model stream each: the cache
tree, the ledger, policy lag and the host's shared-memory ring stay exactly as they are,
and every model advances in the same update anyway. The price is M times the bytes per
version, which is small for the MLP and Nature-CNN sizes a population is made of.

To the learner loop and the checkpoint a population is one `Algorithm`
(learner/algorithms/base.py): `update` takes M batches, `priorities` gives one tensor per
model's batch, stats add each model's loss as "m<k>/loss". Its checkpoint state is one
DQN's, widened: `online` and `target` are ModuleLists of the models' networks
(state-dict names `<k>.<name>`), `optimizer` shows the M optimizers as one
(`JointOptimizer`), `updates` is the shared update count.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from canopy.config import LearnerConfig
from canopy.envs import EnvSpec
from canopy.learner.algorithms import dqn
from canopy.learner.algorithms.base import Batch, Built, OnlineTarget, Stats
from canopy.learner.algorithms.dqn import DQN
from canopy.learner.overlap import OverlapTrainer

MEMBER_PREFIX = "m"  # a population version's array names: "m<k>/<name>"


class JointOptimizer:
    """The models' optimizers seen as one torch optimizer state dict, for checkpoints.

    Parameter indices run on from one optimizer to the next and the param groups are
    concatenated, which is the state dict one optimizer over all the groups would have.
    """

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]):
        self.optimizers = list(optimizers)

    def state_dict(self) -> dict[str, Any]:
        """Every model's optimizer state, renumbered into one torch optimizer state dict."""
        state: dict[int, Any] = {}
        groups: list[dict[str, Any]] = []
        base = 0
        for opt in self.optimizers:
            sd = opt.state_dict()
            state.update({base + idx: s for idx, s in sd["state"].items()})
            groups += [{**g, "params": [base + i for i in g["params"]]} for g in sd["param_groups"]]
            base += sum(len(g["params"]) for g in sd["param_groups"])
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Split a joint state dict back over the models' optimizers (ValueError if it does not fit)."""
        groups = list(sd["param_groups"])
        if len(groups) != sum(len(opt.param_groups) for opt in self.optimizers):
            raise ValueError(f"optimizer state has {len(groups)} param groups for this population")
        base = 0
        for opt in self.optimizers:
            mine, groups = groups[: len(opt.param_groups)], groups[len(opt.param_groups) :]
            ids = [i for g in mine for i in g["params"]]
            opt.load_state_dict(
                {
                    "state": {i - base: sd["state"][i] for i in ids if i in sd["state"]},
                    "param_groups": [{**g, "params": [i - base for i in g["params"]]} for g in mine],
                }
            )
            base += len(ids)


class JointSchedulers:
    """The models' learning-rate schedulers as one state dict (a list, model by model)."""

    def __init__(self, schedulers: Sequence[torch.optim.lr_scheduler.LRScheduler]):
        self.schedulers = list(schedulers)

    def state_dict(self) -> dict[str, Any]:
        """Each model's scheduler state, under "members"."""
        return {"members": [s.state_dict() for s in self.schedulers]}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Hand each model's scheduler its own entry (ValueError when the count differs)."""
        members = sd.get("members")
        if not isinstance(members, list) or len(members) != len(self.schedulers):
            raise ValueError(f"scheduler state does not hold {len(self.schedulers)} models")
        for s, member in zip(self.schedulers, members, strict=True):
            s.load_state_dict(member)


class Population(OnlineTarget):
    """Example:
    pop = Population([DQN(net_k, cfg_k) for k in range(3)])
    stats = pop.update([batch_0, batch_1, batch_2])  # one update of every model
    arrays = pop.export()  # {"m0/layers.0.weight": ..., "m1/...": ...}
    """

    report_every = 50  # updates between stats reports

    def __init__(self, members: Sequence[DQN]):
        self.members = list(members)
        self.online = nn.ModuleList([m.online for m in self.members])
        self.target = nn.ModuleList([m.target for m in self.members])
        self.optimizer = JointOptimizer([m.optimizer for m in self.members])
        schedulers = [m.scheduler for m in self.members if m.scheduler is not None]
        self.scheduler = JointSchedulers(schedulers) if schedulers else None
        # With a process group up, each model's all-reduce overlaps the next one's backward
        # pass; alone, the same calls reduce nothing and the models train one after another.
        self.trainer = OverlapTrainer(self.members)

    @property
    def models(self) -> int:
        """How many models, and so how many replay batches one `update` takes."""
        return len(self.members)

    @property
    def updates(self) -> int:
        """The shared update count (every model steps on every update)."""
        return self.members[0].updates

    @updates.setter
    def updates(self, value: int) -> None:
        """A checkpoint restore sets the shared count on every model."""
        for m in self.members:
            m.updates = value

    @property
    def last_td_error(self) -> list[torch.Tensor | None]:
        """Each model's TD errors on its own batch (new priorities for those items)."""
        return [m.last_td_error for m in self.members]

    def priorities(self) -> list[torch.Tensor] | None:
        """Each model's |TD errors| on its own batch, in batch order."""
        errors = [m.last_td_error for m in self.members]
        if any(e is None for e in errors):
            return None  # before the first update
        return errors

    def update(self, batches: Sequence[Batch]) -> Stats:
        """One update of every model on its own batch; the means, plus each model's loss."""
        stats = self.trainer.step(batches, overlap=True)
        return {
            "loss": torch.stack([s["loss"] for s in stats]).mean(),
            "q_mean": torch.stack([s["q_mean"] for s in stats]).mean(),
            **{f"{MEMBER_PREFIX}{k}/loss": s["loss"] for k, s in enumerate(stats)},
        }

    def export(self) -> dict[str, np.ndarray]:
        """Every model's arrays in one version, named `m<k>/<name>`."""
        return {
            f"{MEMBER_PREFIX}{k}/{name}": array
            for k, m in enumerate(self.members)
            for name, array in m.export().items()
        }

    def join_group(self) -> None:
        """Nothing to hook: `OverlapTrainer` reduces each model's gradients over the group
        by itself once the process group is up, overlapping them with the next backward."""


def member_configs(cfg: Any) -> list[Any]:
    """The learner config of each model: the shared one with that model's learning rate."""
    rates = cfg.model_lr or [cfg.lr] * cfg.models
    return [dataclasses.replace(cfg, lr=lr) for lr in rates]


def build(spec: EnvSpec, cfg: LearnerConfig, device: torch.device) -> Built:
    """`learner.models` DQNs on `device`, each with its own learning rate, as one algorithm."""
    members = [dqn.build(spec, member_cfg, device) for member_cfg in member_configs(cfg)]
    return Built(Population([m.algorithm for m in members]), members[0].arch)
