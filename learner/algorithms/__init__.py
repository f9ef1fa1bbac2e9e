"""Learning algorithms, one readable file each, and the registry that picks one.

Every algorithm is an `Algorithm` (learner/algorithms/base.py: `update(batch)` -> stats as
0-d device tensors, `priorities()`, `export()`, `state()` / `restore()`, `join_group()`,
`models`, `report_every`, `updates`, `online`). Each file ends in a `build(spec, cfg, device) -> Built`;
`BUILDERS` names them for `learner.algorithm`, and "auto" picks by the env's action space.
With `learner.models > 1` "dqn" builds a Population (learner/algorithms/population.py): the
same interface, `update` then taking one batch per model. The on-policy algorithms (ppo,
impala) take `Unrolls` from the replay queue table instead of n-step transitions; r2d2 takes
`Sequences` (with their stored recurrent state) from the prioritized main table.

A new algorithm: one file with its class and `build`, one line in `BUILDERS` (and its name
among the choices of `learner.algorithm` in canopy/config.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from canopy.config import LearnerConfig
from canopy.envs import EnvSpec
from canopy.errors import UserError
from canopy.learner.algorithms import dqn, impala, population, ppo, r2d2, sac, td3
from canopy.learner.algorithms.base import (
    Algorithm,
    Batch,
    Built,
    Sequences,
    Stats,
    TrainingState,
    Unrolls,
    host_stats,
)

__all__ = [
    "BUILDERS",
    "Algorithm",
    "Batch",
    "Built",
    "Sequences",
    "Stats",
    "TrainingState",
    "Unrolls",
    "host_stats",
    "make",
]

Builder = Callable[[EnvSpec, LearnerConfig, torch.device], Built]


def _dqn(spec: EnvSpec, cfg: LearnerConfig, device: torch.device) -> Built:
    """Discrete actions: one DQN, or a population of them with `learner.models > 1`."""
    return (population.build if cfg.models > 1 else dqn.build)(spec, cfg, device)


BUILDERS: dict[str, Builder] = {
    "dqn": _dqn,
    "td3": td3.build,  # Box actions
    "sac": sac.build,  # Box actions, a stochastic policy with a learned entropy weight
    "ppo": ppo.build,  # on-policy, from the unrolls queue; either action space
    "impala": impala.build,  # on-policy with V-trace; either action space
    "r2d2": r2d2.build,  # recurrent DQN from prioritized replay of sequences; Discrete actions
}


def auto(spec: EnvSpec) -> str:
    """The algorithm `learner.algorithm = "auto"` picks for an env's action space."""
    return "dqn" if spec.discrete else "td3"


def make(spec: EnvSpec, cfg: LearnerConfig, device: torch.device) -> Built:
    """The configured algorithm for an env, on `device`, and the architecture name actors get.

    A choice that does not fit the env's action space is a one-line UserError.
    """
    name = auto(spec) if cfg.algorithm == "auto" else cfg.algorithm
    builder = BUILDERS.get(name)
    if builder is None:
        raise UserError(f"unknown learner.algorithm {name!r}: use auto, {', '.join(BUILDERS)}")
    return builder(spec, cfg, device)
