"""actors/actor.py: the step that builds transitions, with Atari's reward clipping, and r2d2's sequences."""

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


def test_r2d2_sequences_store_the_state_their_first_step_was_acted_from() -> None:
    """The acting loop's sequences (one sub-env of the real partially observed CartPole):
    a fresh one starts from the zero state; any other from the state the policy reaches
    by acting through the steps between its start and the previous sequence's start."""
    import torch

    from canopy.actors.actor import _act_and_add, _priorities
    from canopy.actors.explore import Explorer
    from canopy.actors.policy import RecurrentState, policy_from_arrays
    from canopy.actors.sequence import SequenceAdder
    from canopy.arch import LSTM_Q
    from canopy.config import load
    from canopy.learner.network import LSTMQNetwork

    torch.manual_seed(0)
    policy = policy_from_arrays(LSTM_Q, LSTMQNetwork(2, 2, [16, 8]).export())
    length, overlap = 6, 2
    env = make_vec("canopy/CartPoleNoVelocity-v1", 1)
    adder = SequenceAdder(1, length, overlap, AutoresetMode.NEXT_STEP)
    explorer = Explorer(env.single_action_space, 1, np.random.default_rng(0), np.array([0.3]))
    explorer.carry = RecurrentState(1, 8)
    try:
        obs, _ = env.reset(seed=0)
        for _ in range(120):
            obs, _ = _act_and_add(env, adder, explorer, policy, obs, 1, False)
    finally:
        env.close()
    chunk = adder.take(len(adder.ready))
    assert chunk is not None and len(chunk["fresh"]) > 5 and 0 < chunk["fresh"].sum() < len(chunk["fresh"])
    for k, fresh in enumerate(chunk["fresh"]):
        if fresh:
            assert not chunk["h0"][k].any() and not chunk["c0"][k].any()
            continue
        h, c = chunk["h0"][k - 1 : k], chunk["c0"][k - 1 : k]
        for t in range(length - overlap):
            _, h, c = policy.step(chunk["obs"][k - 1 : k, t], h, c)
        np.testing.assert_allclose(h[0], chunk["h0"][k], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(c[0], chunk["c0"][k], rtol=1e-5, atol=1e-6)
    sets = [f"learner.unroll_length={length}", f"learner.overlap={overlap}", "learner.burn_in=2"]
    cfg = load(None, ['learner.algorithm="r2d2"', *sets])
    priorities = _priorities(cfg, policy, chunk)
    assert (
        priorities.shape == chunk["fresh"].shape and np.isfinite(priorities).all() and (priorities > 0).all()
    )
