"""actors/explore.py: exploration per action space, and Ape-X priorities on actors."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch

from canopy.actors.explore import Explorer, initial_priorities
from canopy.actors.policy import policy_from_arrays
from canopy.learner.algorithms.td3 import ARCH as TD3_ARCH
from canopy.learner.algorithms.td3 import Actor
from canopy.learner.network import QNetwork


def q_policy():
    torch.manual_seed(0)
    return policy_from_arrays("mlp", QNetwork(4, 3, [16]).export())


def test_discrete_actions_are_greedy_at_epsilon_zero_and_uniform_before_any_policy() -> None:
    obs = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    explorer = Explorer(gym.spaces.Discrete(3), 8, np.random.default_rng(0), np.zeros(8))
    stored, env_actions = explorer.act(q_policy(), obs)
    np.testing.assert_array_equal(stored, q_policy().q_values(obs).argmax(axis=1))
    assert stored is env_actions
    random_actions, _ = explorer.act(None, obs)
    assert random_actions.min() >= 0 and random_actions.max() < 3


def test_box_actions_are_stored_in_unit_range_and_scaled_to_the_env_bounds() -> None:
    torch.manual_seed(0)
    policy = policy_from_arrays(TD3_ARCH, Actor(3, 2, [16]).export())
    space = gym.spaces.Box(np.array([-2.0, 0.0], np.float32), np.array([2.0, 10.0], np.float32))
    explorer = Explorer(space, 5, np.random.default_rng(0), noise=0.3)
    obs = np.random.default_rng(1).normal(size=(5, 3)).astype(np.float32)
    stored, env_actions = explorer.act(policy, obs)
    assert stored.dtype == np.float32 and np.abs(stored).max() <= 1.0
    np.testing.assert_allclose(
        env_actions, space.low + (stored + 1) / 2 * (space.high - space.low), rtol=1e-6
    )
    greedy = explorer.greedy(policy, obs)
    assert space.contains(greedy[0].astype(np.float32))


def test_actor_priorities_are_the_one_step_td_error_of_the_actors_q_values() -> None:
    policy = q_policy()
    rng = np.random.default_rng(0)
    chunk = {
        "obs": rng.normal(size=(6, 4)).astype(np.float32),
        "action": rng.integers(3, size=6),
        "reward": rng.normal(size=6).astype(np.float32),
        "next_obs": rng.normal(size=(6, 4)).astype(np.float32),
        "discount": np.array([0.9, 0.9, 0.0, 0.9, 0.0, 0.9], np.float32),
    }
    p = initial_priorities(policy, chunk, floor=0.0)
    q, q_next = policy.q_values(chunk["obs"]), policy.q_values(chunk["next_obs"])
    for i in range(6):
        expected = chunk["reward"][i] + chunk["discount"][i] * q_next[i].max() - q[i, chunk["action"][i]]
        assert np.isclose(p[i], abs(expected), rtol=1e-5)
