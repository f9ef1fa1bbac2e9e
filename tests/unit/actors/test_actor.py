"""actors/actor.py: the step that builds transitions, with Atari's reward clipping."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.vector import AutoresetMode

from canopy.actors.actor import step_and_add
from canopy.actors.adder import NStepAdder
from canopy.envs import make_vec


class BigRewards(gym.Env):
    """Three steps with rewards 5, -3, 0.5, then termination: a game score of 2.5."""

    REWARDS = (5.0, -3.0, 0.5)
    observation_space = gym.spaces.Box(0.0, 3.0, (1,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(1, np.float32), {}

    def step(self, action):
        reward = self.REWARDS[self.t]
        self.t += 1
        return np.full(1, self.t, np.float32), reward, self.t == len(self.REWARDS), False, {}


gym.register("CanopyBigRewards-v0", entry_point=BigRewards)


def play(clip: bool, steps: int = 8) -> tuple[np.ndarray, list[float]]:
    """Stored rewards of every transition and the episode returns the env reported."""
    env = make_vec("CanopyBigRewards-v0", 2)
    adder = NStepAdder(2, n_step=1, gamma=0.99, mode=AutoresetMode.NEXT_STEP)
    returns: list[float] = []
    try:
        obs, _ = env.reset(seed=0)
        for _ in range(steps):
            actions = np.zeros(2, np.int64)
            obs, info = step_and_add(env, adder, obs, actions, actions, 7, clip)
            if "episode" in info:
                returns += info["episode"]["r"][info["_episode"]].tolist()
    finally:
        env.close()
    chunk = adder.take(len(adder.ready))
    assert chunk is not None
    return chunk["reward"], returns


def test_clipped_transitions_store_the_reward_sign_while_returns_stay_game_scores() -> None:
    rewards, returns = play(clip=True)
    assert sorted(rewards.tolist()) == sorted([1.0, -1.0, 1.0] * 4)  # 2 envs x 2 episodes
    assert returns == pytest.approx([2.5] * 4)


def test_unclipped_transitions_store_the_true_rewards() -> None:
    rewards, returns = play(clip=False)
    assert sorted(rewards.tolist()) == sorted([5.0, -3.0, 0.5] * 4)
    assert returns == pytest.approx([2.5] * 4)
