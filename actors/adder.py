"""The one place that turns vector-env steps into n-step transitions.

Gymnasium 1.x vector envs reset finished sub-envs automatically, in one of two modes:

* NEXT_STEP (the default): the step that ends an episode returns the true final
  observation; the *following* step ignores the action, returns the reset observation
  and reward 0. That following step is not a transition and is dropped here.
* SAME_STEP: the step that ends an episode returns the reset observation; the true final
  observation is in `info["final_obs"]`.

Each emitted transition is (obs, action, n-step return, next_obs, discount, version):
    return   = r_t + g r_{t+1} + ... + g^{k-1} r_{t+k-1}
    discount = g^k if the learner should bootstrap from next_obs, else 0
A termination (the MDP really ended) gives discount 0. A truncation (a time limit cut the
episode short) still bootstraps: the state after it had a future the agent could not see.
"""

from __future__ import annotations

from collections import deque

import numpy as np
from gymnasium.vector import AutoresetMode

FIELDS = ("obs", "action", "reward", "next_obs", "discount", "version")


class NStepAdder:
    """Example:
    adder = NStepAdder(num_envs=8, n_step=3, gamma=0.99, mode=AutoresetMode.NEXT_STEP)
    adder.add(obs, actions, rewards, next_obs, terminated, truncated, info, version)
    chunk = adder.take(64)  # dict of arrays once 64 transitions are ready, else None
    """

    def __init__(self, num_envs: int, n_step: int, gamma: float, mode: AutoresetMode):
        if mode not in (AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP):
            raise ValueError(f"unsupported autoreset mode {mode}; use NEXT_STEP or SAME_STEP")
        self.n, self.gamma, self.mode = n_step, gamma, mode
        self.windows: list[deque] = [deque() for _ in range(num_envs)]
        self.skip = np.zeros(num_envs, dtype=bool)  # NEXT_STEP: the coming step is a reset
        self.ready: list[tuple] = []

    def add(self, obs, actions, rewards, next_obs, terminated, truncated, info, version: int) -> None:
        """Feed one vector step: arrays with one entry per sub-env."""
        done = np.logical_or(terminated, truncated)
        for i in range(len(self.windows)):
            if self.skip[i]:
                continue  # the reset step after an episode end: obs is new, action ignored
            final = next_obs[i]
            if self.mode is AutoresetMode.SAME_STEP and done[i]:
                final = info["final_obs"][i]
            window = self.windows[i]
            window.append((obs[i], actions[i], float(rewards[i]), version))
            if terminated[i]:
                self._flush(window, final, bootstrap=False)
            elif truncated[i]:
                self._flush(window, final, bootstrap=True)
            elif len(window) == self.n:
                self._emit(window, final, bootstrap=True)
                window.popleft()
        if self.mode is AutoresetMode.NEXT_STEP:
            self.skip = done.copy()

    def take(self, count: int) -> dict[str, np.ndarray] | None:
        """The oldest `count` ready transitions as column arrays, or None if fewer are ready."""
        if len(self.ready) < count:
            return None
        rows, self.ready = self.ready[:count], self.ready[count:]
        cols = list(zip(*rows, strict=True))
        return {
            "obs": np.stack(cols[0]),
            "action": np.asarray(cols[1], dtype=np.int64),
            "reward": np.asarray(cols[2], dtype=np.float32),
            "next_obs": np.stack(cols[3]),
            "discount": np.asarray(cols[4], dtype=np.float32),
            "version": np.asarray(cols[5], dtype=np.int64),
        }

    def _flush(self, window: deque, final, bootstrap: bool) -> None:
        while window:
            self._emit(window, final, bootstrap)
            window.popleft()

    def _emit(self, window: deque, next_obs, bootstrap: bool) -> None:
        ret = 0.0
        for k, (_, _, r, _) in enumerate(window):
            ret += self.gamma**k * r
        obs, action, _, version = window[0]
        discount = self.gamma ** len(window) if bootstrap else 0.0
        self.ready.append((obs, action, ret, next_obs, discount, version))
