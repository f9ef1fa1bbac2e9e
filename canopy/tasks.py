"""Tasks canopy ships with, registered in gymnasium under canopy's namespace (`canopy/...`).

Place in the data flow: canopy/envs.py `check_env_id` calls `register` before it resolves
any env id, so every process that builds an env (actors, the evaluator, the learner's
`env_spec`, `canopy check-env`, `canopy eval`, the launcher's check) knows these ids; an
async vector env's workers import this module through the entry point string.

- `canopy/CartPoleNoVelocity-v1`: CartPole-v1 whose observation keeps the cart position and
  the pole angle and hides both velocities. A feed-forward Q-network sees no motion in one
  observation, so only a policy with memory (r2d2's LSTM) can balance it well: the
  partially observed task recurrent learners are checked on.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium.envs.classic_control.cartpole import CartPoleEnv

CARTPOLE_NO_VELOCITY = "canopy/CartPoleNoVelocity-v1"
VISIBLE = np.array([0, 2])  # cart position, pole angle (CartPole's state is x, x', theta, theta')


class CartPoleNoVelocityEnv(CartPoleEnv):
    """CartPole's dynamics, rewards and ends; the observation is (x, theta) only."""

    def __init__(self, render_mode: str | None = None):
        super().__init__(render_mode=render_mode)
        full = self.observation_space
        self.observation_space = gym.spaces.Box(full.low[VISIBLE], full.high[VISIBLE], dtype=np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """CartPole's reset; the observation without its velocities."""
        obs, info = super().reset(seed=seed, options=options)
        return obs[VISIBLE], info

    def step(self, action):
        """CartPole's step; the observation without its velocities."""
        obs, reward, terminated, truncated, info = super().step(action)
        return obs[VISIBLE], reward, terminated, truncated, info


def register() -> None:
    """Register canopy's tasks in gymnasium (idempotent: a second call changes nothing)."""
    if CARTPOLE_NO_VELOCITY not in gym.registry:
        gym.register(
            CARTPOLE_NO_VELOCITY,
            entry_point="canopy.tasks:CartPoleNoVelocityEnv",
            max_episode_steps=500,
            reward_threshold=475.0,
        )
