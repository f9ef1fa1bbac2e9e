"""canopy/envs.py: vector envs as actors build them, Atari preprocessing included."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

from canopy.config import EnvConfig
from canopy.envs import EnvSpec, check_env_id, clips_rewards, env_spec, make_one, make_vec
from canopy.errors import UserError


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


# ---- environments a user brings: module-qualified ids and env.kwargs ----------------------

USER_ID = "user_envs:CanopyUserDrift-v0"  # tests/user_envs.py registers it when imported


@pytest.fixture
def fresh_user_module() -> Iterator[None]:
    """Neither the module nor its id is known yet, as in a fresh role process."""

    def forget() -> None:
        sys.modules.pop("user_envs", None)
        gym.registry.pop("CanopyUserDrift-v0", None)

    forget()
    yield
    forget()


@pytest.mark.usefixtures("fresh_user_module")
def test_a_module_qualified_id_imports_its_module_before_the_lookup() -> None:
    check_env_id(USER_ID)
    assert "user_envs" in sys.modules and "CanopyUserDrift-v0" in gym.registry


@pytest.mark.usefixtures("fresh_user_module")
def test_a_module_qualified_id_builds_everywhere_with_its_kwargs() -> None:
    assert env_spec(USER_ID) == EnvSpec((2,), "float32", 2, discrete=True)
    cfg = EnvConfig(id=USER_ID, kwargs={"speed": 2.5})
    env = make_vec(USER_ID, 2, cfg)
    try:
        assert [e.unwrapped.speed for e in env.unwrapped.envs] == [2.5, 2.5]
        obs, _ = env.reset(seed=0)
        assert obs[:, 1].tolist() == [2.5, 2.5]
    finally:
        env.close()
    one = make_one(USER_ID, cfg)
    try:
        assert one.unwrapped.speed == 2.5
    finally:
        one.close()


def one_line_error(env_id: str) -> str:
    with pytest.raises(UserError) as info:
        check_env_id(env_id)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_a_module_that_cannot_be_imported_is_named_with_the_fix() -> None:
    message = one_line_error("no_such_pkg.envs:Thing-v0")
    assert "cannot import module 'no_such_pkg.envs'" in message and "PYTHONPATH" in message


def test_a_module_that_fails_while_importing_says_how(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "canopy_broken_envs.py").write_text("raise RuntimeError('no licence\\nfor this simulator')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    message = one_line_error("canopy_broken_envs:Thing-v0")
    assert "module 'canopy_broken_envs' failed: RuntimeError: no licence for this simulator" in message


def test_a_module_that_registers_no_such_id_is_told_what_to_register() -> None:
    message = one_line_error("json:Thing-v0")
    assert "importing 'json' did not register it" in message and "gymnasium.register(id='Thing-v0'" in message


def test_unknown_ids_and_ids_with_two_colons_are_refused_in_one_line() -> None:
    assert "unknown env id 'NoSuchEnv-v0'" in one_line_error("NoSuchEnv-v0")
    assert "one colon" in one_line_error("a:b:C-v0")


def test_env_kwargs_reach_the_env_in_every_builder() -> None:
    cfg = EnvConfig(id="Pendulum-v1", kwargs={"g": 3.5})
    env = make_vec("Pendulum-v1", 2, cfg)
    try:
        assert [e.unwrapped.g for e in env.unwrapped.envs] == [3.5, 3.5]
    finally:
        env.close()
    one = make_one("Pendulum-v1", cfg, render_mode="rgb_array")
    try:
        assert one.unwrapped.g == 3.5 and one.render_mode == "rgb_array"
    finally:
        one.close()
    assert env_spec("Pendulum-v1", cfg) == EnvSpec((3,), "float32", 1, discrete=False)


def test_a_kwarg_the_env_does_not_take_is_one_line_naming_env_kwargs() -> None:
    cfg = EnvConfig(id="Pendulum-v1", kwargs={"gravity": 3.5})
    for build in (lambda: make_vec("Pendulum-v1", 1, cfg), lambda: make_one("Pendulum-v1", cfg)):
        with pytest.raises(UserError, match=r"env\.kwargs = \{'gravity': 3\.5\} do not fit") as info:
            build()
        assert "gravity" in str(info.value) and "\n" not in str(info.value)


def test_rewards_are_clipped_for_atari_ids_only_and_only_when_asked() -> None:
    assert clips_rewards(EnvConfig(id="ALE/Pong-v5"))
    assert clips_rewards(EnvConfig(id="ale_py:ALE/Pong-v5"))
    assert not clips_rewards(EnvConfig(id="ALE/Pong-v5", clip_rewards=False))
    assert not clips_rewards(EnvConfig(id="CartPole-v1"))


def test_one_atari_env_is_preprocessed_as_the_actors_see_it() -> None:
    pytest.importorskip("ale_py", reason="Atari needs pip install 'canopy-rl[atari]'")
    pytest.importorskip("cv2", reason="Atari preprocessing needs opencv")
    env = make_one("ALE/Pong-v5", EnvConfig(id="ALE/Pong-v5", frame_stack=3))
    try:
        obs, _ = env.reset(seed=0)
        assert obs.shape == (3, 84, 84) and obs.dtype == np.uint8
    finally:
        env.close()
