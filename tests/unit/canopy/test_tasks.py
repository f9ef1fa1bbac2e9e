"""canopy/tasks.py: canopy/CartPoleNoVelocity-v1 hides CartPole's velocities, and its id
resolves wherever canopy resolves an env id, in any process."""

from __future__ import annotations

import subprocess
import sys

import gymnasium as gym
import numpy as np
from conftest import REPO_ROOT

from canopy.envs import env_spec, make_one, make_vec
from canopy.tasks import CARTPOLE_NO_VELOCITY, CartPoleNoVelocityVectorEnv


def test_the_observation_is_cartpoles_position_and_angle_only() -> None:
    env = make_one(CARTPOLE_NO_VELOCITY)
    full = gym.make("CartPole-v1")
    try:
        obs, _ = env.reset(seed=3)
        want, _ = full.reset(seed=3)
        assert env.observation_space.shape == (2,)
        np.testing.assert_array_equal(obs, want[[0, 2]])
        for _ in range(5):  # the same dynamics and rewards, velocities dropped
            obs, r, term, trunc, _ = env.step(1)
            want, r_full, term_full, trunc_full, _ = full.step(1)
            np.testing.assert_array_equal(obs, want[[0, 2]])
            assert (r, term, trunc) == (r_full, term_full, trunc_full)
            assert env.observation_space.contains(obs)
    finally:
        env.close()
        full.close()
    assert gym.spec(CARTPOLE_NO_VELOCITY).max_episode_steps == 500
    spec = env_spec(CARTPOLE_NO_VELOCITY)
    assert (spec.obs_shape, spec.actions, spec.discrete) == ((2,), 2, True)
    vec, full_vec = make_vec(CARTPOLE_NO_VELOCITY, 3), make_vec("CartPole-v1", 3)
    try:  # the numpy vector form, CartPole-v1's steps with the velocities dropped
        assert isinstance(vec.unwrapped, CartPoleNoVelocityVectorEnv)
        np.testing.assert_array_equal(vec.reset(seed=0)[0], full_vec.reset(seed=0)[0][:, [0, 2]])
        for _ in range(30):
            obs, r, term, trunc, _ = vec.step(np.ones(3, np.int64))
            want, r_full, term_full, trunc_full, _ = full_vec.step(np.ones(3, np.int64))
            np.testing.assert_array_equal(obs, want[:, [0, 2]])
            assert (r == r_full).all() and (term == term_full).all() and (trunc == trunc_full).all()
        assert vec.single_observation_space.shape == (2,) and vec.observation_space.shape == (3, 2)
    finally:
        vec.close()
        full_vec.close()


def test_the_id_resolves_in_a_fresh_process_through_check_env() -> None:
    # A fresh interpreter has never imported canopy.tasks: `canopy check-env` must find the id.
    out = subprocess.run(
        [sys.executable, "-m", "canopy.cluster.cli", "check-env", CARTPOLE_NO_VELOCITY],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert CARTPOLE_NO_VELOCITY in out.stdout + out.stderr
