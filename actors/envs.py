"""Building gymnasium environments the way every role needs them, with one-line errors."""

from __future__ import annotations

import gymnasium as gym
from gymnasium.vector import AutoresetMode

from cluster.errors import UserError


def check_env_id(env_id: str) -> None:
    """Fail early, in one line, on an id gymnasium does not know."""
    try:
        gym.spec(env_id)
    except gym.error.Error as exc:
        raise UserError(
            f"unknown env id {env_id!r} ({exc}): use a registered gymnasium id such as "
            "CartPole-v1, or install the package that registers it"
        ) from None


def make_vec(env_id: str, num_envs: int) -> gym.vector.VectorEnv:
    """A synchronous vector env in NEXT_STEP autoreset mode, with episode statistics.

    The mode is set explicitly because actors/adder.py depends on it.
    """
    check_env_id(env_id)
    env = gym.make_vec(
        env_id,
        num_envs=num_envs,
        vectorization_mode="sync",
        vector_kwargs={"autoreset_mode": AutoresetMode.NEXT_STEP},
    )
    if not isinstance(env.single_action_space, gym.spaces.Discrete):
        raise UserError(
            f"env {env_id!r} has action space {env.single_action_space}: the DQN learner needs "
            "a discrete (Discrete) action space"
        )
    return gym.wrappers.vector.RecordEpisodeStatistics(env)


def spaces(env_id: str) -> tuple[int, int]:
    """(flat observation size, number of actions) of an env id."""
    env = make_vec(env_id, 1)
    try:
        obs_size = int(gym.spaces.flatdim(env.single_observation_space))
        return obs_size, int(env.single_action_space.n)
    finally:
        env.close()


def seed_base(run_seed: int, ident: int, num_envs: int) -> int:
    """First env seed of actor `ident`: distinct, non-overlapping ranges for 2**20 env copies."""
    return (run_seed * 2**20 + ident * num_envs) % 2**31
