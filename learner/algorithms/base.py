"""The seam every learning algorithm fits: all the learner role and the checkpoint know of one.

Place in the data flow: replay batches -> `Algorithm.update` -> stats (read on the host only
when the role reports) and `priorities` (back to prioritized replay) -> `export` (the arrays
a published version holds, what actors act with). Checkpoints: `state` ->
learner/checkpoint/state.py (raw tensor bytes + msgpack, no pickle) -> `restore`.

An algorithm is one file read top to bottom (dqn.py, td3.py; learner/algorithms/population.py trains
several DQNs as one): its networks, its loss with the maths beside it, the methods below,
and a `build(spec, cfg, device) -> Built` that the registry in learner/algorithms/__init__.py
names (`learner.algorithm`). learner/role.py depends on nothing else, so one training loop
serves every algorithm, alone or in a learner group.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn


@dataclass
class Batch:
    """One replay batch on the learner's device (n-step transitions, actors/adder.py)."""

    obs: torch.Tensor
    action: torch.Tensor
    reward: torch.Tensor
    next_obs: torch.Tensor
    discount: torch.Tensor
    weight: torch.Tensor | None = None  # importance-sampling weights from prioritized replay


@dataclass
class Unrolls:
    """One batch of unrolls for an on-policy learner, on its device (actors/unroll.py):
    B unrolls of T steps, obs [B, T + 1, ...] (obs[:, L] the bootstrap observation of an
    unroll of L real steps), the rest [B, T]; `logp` is the behaviour policy's, `version`
    the packed policy version that acted."""

    obs: torch.Tensor
    action: torch.Tensor
    reward: torch.Tensor
    terminated: torch.Tensor
    truncated: torch.Tensor
    mask: torch.Tensor
    logp: torch.Tensor
    version: torch.Tensor


@dataclass
class Sequences:
    """One batch of r2d2 sequences on the learner's device (actors/sequence.py): B sequences
    of T steps of one episode each, obs [B, T + 1, ...] (obs[:, L] what the last of L real
    steps bootstraps from), action/reward/terminated/mask [B, T], `fresh` [B] (1: obs[:, 0]
    starts an episode), the stored LSTM state h0, c0 [B, H], and importance weights [B]."""

    obs: torch.Tensor
    action: torch.Tensor
    reward: torch.Tensor
    terminated: torch.Tensor
    mask: torch.Tensor
    fresh: torch.Tensor
    h0: torch.Tensor
    c0: torch.Tensor
    weight: torch.Tensor | None = None


Stats = dict[str, torch.Tensor]
"""What `update` returns; see `Algorithm.update`."""


@dataclass
class TrainingState:
    """An algorithm's whole training state, in the two forms a checkpoint stores (no pickle).

    `tensors`: every tensor, by a name that is the same for every build from the same config
    (they become the checkpoint layout: raw bytes, any dtype, bit exact; the names `rng.*`
    belong to the checkpoint). `meta`: everything else, as plain msgpack data (dicts, lists,
    str, int, float, bool, None, bytes; no tuples on the way back). `updates`: the update
    count, which also names the checkpoint's step.
    """

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    updates: int


class Algorithm(Protocol):
    """What learner/role.py and learner/checkpoint/state.py use of a learning algorithm.

    Building: `learner.algorithms.make(spec, cfg, device) -> Built` looks `cfg.algorithm` up
    in the registry ("auto" picks by the env's action space) and calls that file's `build`,
    which puts the networks on `device`. A build that does not fit the env's action space
    raises a one-line UserError that names the setting to change.

    Group training (`learner.learners > 1`): every rank builds the same algorithm, takes
    rank 0's `state` through `restore`, then calls `join_group`; from then on each update
    averages gradients over the group, so every rank's `online` stays identical.
    """

    models: int
    """How many replay batches one `update` takes: 1, or one per model of a population."""

    updates: int
    """Updates made so far (set back by `restore`); publishing and reporting count them."""

    online: nn.Module
    """Every network the algorithm trains; a learner group's ranks compare its digest."""

    report_every: int
    """Updates between two reports of `update`'s stats (every rank of a group alike)."""

    def update(self, batch: Any) -> Stats:
        """One update on `batch` (a `Batch`; a list of `models` Batches when `models` > 1;
        `Unrolls` for an on-policy algorithm).

        Returns named scalars as 0-d tensors, detached and still on the algorithm's device,
        the same kind for every algorithm: never floats read with `.item()`, which would
        make the host wait for the GPU at every update. The role converts them with
        `host_stats` only on the updates it reports and shows each under its own name in
        the learner's stats hash. "loss" is always there ("q_mean" for value-based
        learners); a population adds each model's value as "m<k>/<name>", as its arrays.
        """
        ...

    def priorities(self) -> list[torch.Tensor] | None:
        """New replay priorities from the last update: |TD error| per item, one 1-d tensor
        (on the device) per batch it took, in order; None for an algorithm without any
        (prioritized replay then keeps the actors' initial priorities)."""
        ...

    def export(self) -> dict[str, np.ndarray]:
        """The float32 arrays actors act with, named as the `Built.arch` policy expects."""
        ...

    def state(self) -> TrainingState:
        """The whole training state (networks, optimizer, schedules, `updates`), uncopied.

        The checkpoint copies the tensors on a thread of its own while the next update runs
        (learner/checkpoint/state.py), fenced by that update's first optimizer step. So an
        update must write none of these tensors before it steps an optimizer: targets,
        schedules and running statistics move after the step, as every algorithm here does
        (tests/unit/learner/test_algorithms.py checks each, bit for bit)."""
        ...

    def restore(self, state: TrainingState) -> None:
        """Load `state` from the same algorithm built from the same config; the next update
        is then bit for bit the one the captured learner would have made (the checkpoint
        restores the RNGs). It may keep the tensors it is given."""
        ...

    def join_group(self) -> None:
        """Average gradients over the (now formed) learner group from the next update on."""
        ...


@dataclass(frozen=True)
class Built:
    """What `algorithms.make` builds: the algorithm, and the architecture name actors build
    their policy from the published arrays with (canopy/arch.py: MLP, TANH_MLP, NATURE_CNN)."""

    algorithm: Algorithm
    arch: str


def host_stats(stats: Mapping[str, torch.Tensor | float]) -> dict[str, float]:
    """`update`'s stats as floats. The host waits here for the GPU's queued work (once: the
    first value drains it), which is why the role calls this only on updates it reports."""
    return {k: float(v) for k, v in stats.items()}


# ---- optimizer steps every algorithm shares ------------------------------------------------
FUSED_DEVICES = ("cpu", "cuda")


def adam(params: Any, lr: float, eps: float = 1e-8) -> torch.optim.Adam:
    """Adam over `params` (tensors or param groups), fused into one kernel where torch has it:
    on a CPU learner that is a fifth of a small network's whole update."""
    groups = [{**g, "params": list(g["params"])} if isinstance(g, dict) else g for g in params]
    tensors = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    fused = all(p.device.type in FUSED_DEVICES and p.is_floating_point() for p in tensors)
    return torch.optim.Adam(groups, lr=lr, eps=eps, fused=fused or None)


@torch.no_grad()
def polyak(target: nn.Module, online: nn.Module, tau: float) -> None:
    """Move every target parameter a fraction `tau` toward the online one (tau 1: copy), as one
    multi-tensor op instead of one small op per parameter."""
    t, o = list(target.parameters()), list(online.parameters())
    if tau == 1:
        torch._foreach_copy_(t, o)
    else:
        torch._foreach_lerp_(t, o, tau)


# ---- the usual torch training state, laid out for the checkpoint --------------------------
def torch_state(
    updates: int, modules: Mapping[str, nn.Module], optimizer: Any, scheduler: Any = None
) -> TrainingState:
    """Module state dicts (tensors "<name>.<key>"), one optimizer (tensors "optim.<param
    index>.<key>", its other values and param groups in meta "optimizer") and an optional
    learning-rate scheduler (meta "scheduler"). `optimizer` and `scheduler` need only
    `state_dict` / `load_state_dict` in torch's form (learner/algorithms/population.py joins several)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        tensors.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
    opt = optimizer.state_dict()
    scalars = {}
    for idx, st in opt["state"].items():
        tensors.update({f"optim.{idx}.{k}": v for k, v in st.items() if isinstance(v, torch.Tensor)})
        scalars[str(idx)] = {k: _plain(v) for k, v in st.items() if not isinstance(v, torch.Tensor)}
    meta = {
        "optimizer": {"param_groups": _plain(opt["param_groups"]), "scalars": scalars},
        "scheduler": _plain(scheduler.state_dict()) if scheduler is not None else None,
    }
    return TrainingState(tensors, meta, updates)


def load_torch_state(
    state: TrainingState, modules: Mapping[str, nn.Module], optimizer: Any, scheduler: Any = None
) -> None:
    """Put what `torch_state` laid out back into the same modules, optimizer and scheduler."""
    for name, module in modules.items():
        prefix = f"{name}."
        module.load_state_dict(
            {k[len(prefix) :]: v for k, v in state.tensors.items() if k.startswith(prefix)}
        )
    opt_state: dict[int, dict[str, Any]] = {
        int(idx): dict(scalars) for idx, scalars in state.meta["optimizer"]["scalars"].items()
    }
    for name, t in state.tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            opt_state.setdefault(int(idx), {})[key] = t
    groups = state.meta["optimizer"]["param_groups"]
    for g in groups:
        if "betas" in g:  # msgpack gave back a list; Adam wants its tuple
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    if scheduler is not None and state.meta.get("scheduler") is not None:
        scheduler.load_state_dict(state.meta["scheduler"])


class OnlineTarget:
    """What DQN, TD3, SAC, R2D2 and a DQN population share as learners laid out alike:
    `online` and `target` modules, one `optimizer`, an lr `scheduler` if it has one, an
    `updates` count, and a `grad_sync` hook each update calls after its backward."""

    online: nn.Module
    target: nn.Module
    optimizer: Any
    updates: int
    grad_sync: Any = None  # learner/overlap.py GradSync once in a group: averages gradients

    def state(self) -> TrainingState:
        """`torch_state` of the online and target networks, the optimizer, the lr schedule if
        any, and the update count."""
        modules = {"online": self.online, "target": self.target}
        return torch_state(self.updates, modules, self.optimizer, getattr(self, "scheduler", None))

    def restore(self, state: TrainingState) -> None:
        """Put back what `state` took, the update count included."""
        modules = {"online": self.online, "target": self.target}
        load_torch_state(state, modules, self.optimizer, getattr(self, "scheduler", None))
        self.updates = state.updates

    def join_group(self) -> None:
        """From the next update on, gradients are averaged over the learner group."""
        from canopy.learner.overlap import GradSync  # torch.distributed: only for a group

        self.grad_sync = GradSync()


def _plain(value: Any) -> Any:
    """Optimizer/scheduler values as msgpack-able data (tuples become lists)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.item()
    return value
