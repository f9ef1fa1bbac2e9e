"""An environment a user brings: this module registers it when imported.

tests/unit/canopy/test_envs.py names it `user_envs:CanopyUserDrift-v0` (under pytest,
tests/ is on sys.path as conftest.py's directory), so canopy must import the module before
gymnasium can find the id. `speed` is a constructor keyword for `env.kwargs`.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

ENV_ID = "CanopyUserDrift-v0"


class Drift(gym.Env):
    """A point drifting at `speed` per step, left or right; reward is its position."""

    def __init__(self, speed: float = 1.0, render_mode: str | None = None):
        self.speed = speed
        self.render_mode = render_mode
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
        self.action_space = gym.spaces.Discrete(2)
        self.x = 0.0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.x = float(self.np_random.uniform(-1, 1))
        return self._obs(), {}

    def step(self, action):
        self.x += self.speed if action == 1 else -self.speed
        return self._obs(), self.x, False, False, {}

    def _obs(self) -> np.ndarray:
        return np.array([self.x, self.speed], np.float32)


gym.register(ENV_ID, entry_point=Drift, max_episode_steps=20)
