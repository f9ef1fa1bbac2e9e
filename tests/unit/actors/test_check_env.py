"""actors/check_env.py: `canopy check-env` on real gymnasium environments."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

from canopy.actors import check_env
from canopy.config import EnvConfig
from canopy.errors import UserError


@pytest.fixture(autouse=True)
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(check_env, "SPEED_SECONDS", 0.1)


class WrongObs(gym.Env):
    """Returns observations outside its declared space: the API checker must catch it."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.array([5.0, 5.0, 5.0], np.float64), {}

    def step(self, action):
        return np.zeros(3), 0.0, False, False, {}


gym.register("CanopyWrongObs-v0", entry_point=WrongObs, max_episode_steps=10)


def verdicts(report: check_env.Report) -> dict[str, str]:
    return {name.strip(): verdict for name, _, verdict in report.rows}


def test_cartpole_is_usable_and_its_stepping_speed_is_measured() -> None:
    report = check_env.check("CartPole-v1")
    assert report.usable
    v = verdicts(report)
    assert v["gymnasium API check"] == v["action space"] == v["reset(seed) determinism"] == "ok"
    speed = next(result for name, result, _ in report.rows if name.startswith("random stepping"))
    assert float(speed.split()[0].replace(",", "")) > 0


def test_a_continuous_action_space_points_to_td3() -> None:
    report = check_env.check("Pendulum-v1")
    assert report.usable
    assert any("td3" in result for name, result, _ in report.rows if name == "action space")


def test_an_env_that_breaks_its_own_observation_space_fails_the_api_check() -> None:
    report = check_env.check("CanopyWrongObs-v0")
    assert not report.usable
    assert verdicts(report)["gymnasium API check"] == "FAIL"


def test_an_unknown_id_is_a_one_line_user_error() -> None:
    with pytest.raises(UserError, match="unknown env id"):
        check_env.check("NoSuchEnv-v9")


def test_a_user_module_env_is_checked_with_its_kwargs() -> None:
    env_id = "user_envs:CanopyUserDrift-v0"  # tests/user_envs.py
    report = check_env.check(env_id, EnvConfig(id=env_id, kwargs={"speed": 0.5}))
    assert report.usable
    assert verdicts(report)["reset(seed) determinism"] == "ok"


def test_a_kwarg_the_env_does_not_take_is_a_one_line_user_error() -> None:
    with pytest.raises(UserError, match=r"env\.kwargs"):
        check_env.check("Pendulum-v1", EnvConfig(id="Pendulum-v1", kwargs={"gravity": 1.0}))
