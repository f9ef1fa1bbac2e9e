"""The one place that cuts vector-env steps into fixed-length unrolls for on-policy learners.

Beside actors/adder.py (n-step transitions for DQN and TD3), and fed the same way: one
call per vector step. An unroll of length T holds one sub-env's consecutive steps:

    obs         [T + 1, ...]  obs[t] acted on at step t; obs[L] is the bootstrap observation
    action      [T, ...]      int64 indices (Discrete) or float32 vectors (Box)
    reward      [T]
    terminated  [T]           1 where the MDP really ended: nothing to bootstrap from
    truncated   [T]           1 where a time limit cut the episode: bootstrap from obs[t + 1]
    mask        [T]           1 for the L real steps, 0 for padding after them
    logp        [T]           log-probability of the action under the behaviour policy
    version     [T]           the policy version that acted

A termination does not end the unroll: the next step starts a new episode, and the learner
multiplies its bootstrap by 0 there. A truncation does end it, padded to T, so that the
true final observation (not the reset one) is obs[L], the bootstrap of its last step; the
n-step adder treats truncation the same way. So for every real step t, obs[t + 1] is what
the value target of step t bootstraps from (times 0 after a termination).

Autoreset modes as in actors/adder.py: NEXT_STEP drops the reset step that follows an
episode end; SAME_STEP takes the final observation from `info["final_obs"]`.
"""

from __future__ import annotations

import numpy as np
from gymnasium.vector import AutoresetMode

from canopy.actors.adder import RealSteps

FIELDS = ("obs", "action", "reward", "terminated", "truncated", "mask", "logp", "version")


class UnrollAdder:
    """Example:
    adder = UnrollAdder(num_envs=8, length=32, mode=AutoresetMode.NEXT_STEP)
    adder.add(obs, actions, rewards, next_obs, terminated, truncated, info, logp, version)
    batch = adder.take(4)  # dict of arrays [4, T(+1), ...] once 4 unrolls are ready, else None
    """

    def __init__(self, num_envs: int, length: int, mode: AutoresetMode):
        if length < 1:
            raise ValueError(f"unroll length must be at least 1, not {length}")
        self.real = RealSteps(num_envs, mode)
        self.length = length
        self.steps: list[list[tuple]] = [[] for _ in range(num_envs)]
        self.ready: list[dict[str, np.ndarray]] = []

    def add(self, obs, actions, rewards, next_obs, terminated, truncated, info, logp, version: int) -> None:
        """Feed one vector step: arrays with one entry per sub-env; `logp` of each action taken."""
        for i, final in self.real.of(next_obs, terminated, truncated, info):
            steps = self.steps[i]
            steps.append((obs[i], actions[i], rewards[i], terminated[i], truncated[i], logp[i], version))
            cut_short = truncated[i] and not terminated[i]
            if cut_short or len(steps) == self.length:
                self.ready.append(self._unroll(steps, final))
                steps.clear()

    def take(self, count: int) -> dict[str, np.ndarray] | None:
        """The oldest `count` ready unrolls stacked along a new first axis, or None if fewer."""
        if len(self.ready) < count:
            return None
        rows, self.ready = self.ready[:count], self.ready[count:]
        return {name: np.stack([row[name] for row in rows]) for name in FIELDS}

    def _unroll(self, steps: list[tuple], bootstrap: np.ndarray) -> dict[str, np.ndarray]:
        n, t = len(steps), self.length
        obs_rows, actions, rewards, terms, truncs, logps, versions = zip(*steps, strict=True)
        # Padding repeats the bootstrap observation: any finite input, since it is masked out.
        obs = np.stack([*obs_rows, *([bootstrap] * (t + 1 - n))])
        action = np.stack(actions)
        return {
            "obs": obs,
            "action": np.concatenate([action, np.zeros((t - n, *action.shape[1:]), action.dtype)]),
            "reward": _padded(rewards, t, np.float32),
            "terminated": _padded(terms, t, np.float32),
            "truncated": _padded(truncs, t, np.float32),
            "mask": _padded([1.0] * n, t, np.float32),
            "logp": _padded(logps, t, np.float32),
            "version": _padded(versions, t, np.int64),
        }


def _padded(values, length: int, dtype) -> np.ndarray:
    out = np.zeros(length, dtype)
    out[: len(values)] = values
    return out
