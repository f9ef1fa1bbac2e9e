"""Learning algorithms, one readable file each, and the choice between them.

Every algorithm offers what the learner loop and the checkpoint capture use:
`update(batch)` -> {'loss', 'q_mean'} (0-d tensors, read only when reported), `export()`
(the arrays actors act with), `online`, `target`, `optimizer`, `updates` and
`last_td_error` (new priorities for prioritized replay). With `learner.models > 1` it is a
Population (learner/population.py): `update` then takes one batch per model.
"""

from __future__ import annotations

from typing import Any

import torch

from actors.envs import EnvSpec
from cluster.config import LearnerConfig
from cluster.errors import UserError


def make(spec: EnvSpec, cfg: LearnerConfig, device: torch.device) -> tuple[Any, str]:
    """The configured algorithm for an env, on `device`, and the architecture name actors get."""
    from learner.algorithms.dqn import DQN
    from learner.algorithms.td3 import ARCH as TD3_ARCH
    from learner.algorithms.td3 import TD3
    from learner.network import build
    from learner.population import Population, member_configs

    algorithm = cfg.algorithm
    if algorithm == "auto":
        algorithm = "dqn" if spec.discrete else "td3"
    if algorithm == "td3" and cfg.models > 1:
        raise UserError("learner.models > 1 trains dqn populations only: this env has Box actions (td3)")
    if algorithm == "dqn":
        if not spec.discrete:
            raise UserError('this env has continuous (Box) actions: set learner.algorithm = "td3"')
        members = []
        for member_cfg in member_configs(cfg):
            net, arch = build(spec.obs_shape, spec.obs_dtype, spec.actions, cfg.hidden, cfg.dueling)
            if cfg.compile:
                net.compile()  # in place: parameter names (checkpoints, actors) stay as they are
            members.append(DQN(net.to(device), member_cfg))
        return (members[0] if cfg.models == 1 else Population(members)), arch
    if spec.discrete:
        raise UserError('this env has Discrete actions: set learner.algorithm = "dqn"')
    obs_size = 1
    for d in spec.obs_shape:
        obs_size *= d
    algo = TD3(obs_size, spec.actions, cfg)
    algo.online.to(device)
    algo.target.to(device)
    return algo, TD3_ARCH
