"""Tasks canopy ships with, registered in gymnasium under canopy's namespace (`canopy/...`).

Place in the data flow: canopy/envs.py `check_env_id` calls `register` before it resolves
any env id, so every process that builds an env (actors, the evaluator, the learner's
`env_spec`, `canopy check-env`, `canopy eval`, the launcher's check) knows these ids; an
async vector env's workers import this module through the entry point string.

- `canopy/CartPoleNoVelocity-v1`: CartPole-v1 whose observation keeps the cart position and
  the pole angle and hides both velocities. A feed-forward Q-network sees no motion in one
  observation, so only a policy with memory (r2d2's LSTM) can balance it well: the
  partially observed task recurrent learners are checked on. Its vector form steps every
  copy in one numpy call, as CartPole-v1's does (canopy/envs.py `make_vec` takes it).
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium.envs.classic_control.cartpole import CartPoleEnv, CartPoleVectorEnv
from gymnasium.vector.utils import batch_space

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


class CartPoleNoVelocityVectorEnv(CartPoleVectorEnv):
    """CartPole's numpy vector env (NEXT_STEP autoreset) with the same observation as
    `CartPoleNoVelocityEnv`: what actors and the evaluator step."""

    def __init__(self, num_envs: int = 1, max_episode_steps: int = 500, render_mode: str | None = None):
        super().__init__(num_envs=num_envs, max_episode_steps=max_episode_steps, render_mode=render_mode)
        full = self.single_observation_space
        self.single_observation_space = gym.spaces.Box(
            full.low[VISIBLE], full.high[VISIBLE], dtype=np.float32
        )
        self.observation_space = batch_space(self.single_observation_space, num_envs)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """CartPole's vector reset; observations without their velocities."""
        obs, info = super().reset(seed=seed, options=options)
        return obs[:, VISIBLE], info

    def step(self, action):
        """CartPole's vector step; observations without their velocities."""
        obs, reward, terminated, truncated, info = super().step(action)
        return obs[:, VISIBLE], reward, terminated, truncated, info


def register() -> None:
    """Register canopy's tasks in gymnasium (idempotent: a second call changes nothing)."""
    if CARTPOLE_NO_VELOCITY not in gym.registry:
        gym.register(
            CARTPOLE_NO_VELOCITY,
            entry_point="canopy.tasks:CartPoleNoVelocityEnv",
            vector_entry_point="canopy.tasks:CartPoleNoVelocityVectorEnv",
            max_episode_steps=500,
            # Without the velocities a greedy policy balances less reliably than CartPole-v1's
            # 475 asks: 400 is the solve `canopy bench zoo` and the docs hold r2d2 to.
            reward_threshold=400.0,
        )
