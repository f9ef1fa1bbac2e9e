"""actors/envs.py: vector envs as actors build them, Atari preprocessing included."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

from actors.envs import EnvSpec, env_spec, make_vec
from cluster.config import EnvConfig
from cluster.errors import UserError


def test_classic_control_envs_keep_their_flat_observations() -> None:
    assert env_spec("CartPole-v1") == EnvSpec((4,), "float32", 2, discrete=True)


def test_box_actions_are_counted_in_dimensions() -> None:
    assert env_spec("Pendulum-v1") == EnvSpec((3,), "float32", 1, discrete=False)


class TwoKnobs(gym.Env):
    observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    action_space = gym.spaces.MultiDiscrete([3, 3])

    def reset(self, *, seed=None, options=None):
        return np.zeros(2, np.float32), {}

    def step(self, action):
        return np.zeros(2, np.float32), 0.0, False, False, {}


gym.register("CanopyTwoKnobs-v0", entry_point=TwoKnobs, max_episode_steps=5)


def test_an_action_space_actors_cannot_act_in_is_refused_in_one_line() -> None:
    with pytest.raises(UserError, match="Discrete spaces"):
        make_vec("CanopyTwoKnobs-v0", 1)


def test_atari_frames_are_grey_84x84_stacks_that_never_mix_episodes() -> None:
    pytest.importorskip("ale_py", reason="Atari needs pip install 'canopy-rl[atari]'")
    pytest.importorskip("cv2", reason="Atari preprocessing needs opencv")
    assert env_spec("ALE/Pong-v5") == EnvSpec((4, 84, 84), "uint8", 6, discrete=True)
    env = make_vec("ALE/Pong-v5", 2, EnvConfig(id="ALE/Pong-v5", frame_stack=3, noop_max=0))
    try:
        obs, _ = env.reset(seed=0)
        assert obs.shape == (2, 3, 84, 84) and obs.dtype == np.uint8
        # At an episode's start every slot of the stack holds its first frame.
        assert all((obs[i, 0] == obs[i, k]).all() for i in range(2) for k in range(3))
        nxt, *_ = env.step(np.zeros(2, dtype=np.int64))
        np.testing.assert_array_equal(nxt[:, :-1], obs[:, 1:])  # the stack shifts by one frame
    finally:
        env.close()


def test_an_asynchronous_vector_env_steps_each_copy_in_its_own_process() -> None:
    env = make_vec("CartPole-v1", 2, asynchronous=True)
    try:
        assert isinstance(env.unwrapped, gym.vector.AsyncVectorEnv)
        env.reset(seed=0)
        nxt, rewards, *_ = env.step(np.zeros(2, dtype=np.int64))
        assert nxt.shape == (2, 4) and rewards.tolist() == [1.0, 1.0]
    finally:
        env.close()
