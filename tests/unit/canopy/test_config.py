"""canopy/config.py: defaults, TOML files, `--set` overrides and the one-line problems."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from canopy import config
from canopy.config import Config
from canopy.errors import ConfigError


def problems_of(overrides: list[str], path: Path | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config.load(path, overrides)
    return info.value.problems


def test_defaults_load_and_pass_verification() -> None:
    cfg = config.load()
    assert cfg == Config()
    assert config.verify(cfg) == []
    assert cfg.env.id == "CartPole-v1"
    assert cfg.learner.hidden == [128, 128]
    assert math.isinf(cfg.run.stop_at_return)


def test_toml_file_values_apply_and_set_overrides_win_over_the_file(tmp_path: Path) -> None:
    path = tmp_path / "cluster.toml"
    path.write_text(
        """
[learner]
lr = 5e-4
hidden = [32]
gamma = 0.9

[actors]
count = 3
"""
    )
    cfg = config.load(path, ["actors.count=5", "learner.hidden=[64,64]", "env.id=Acrobot-v1"])

    assert cfg.learner.lr == pytest.approx(5e-4)
    assert cfg.learner.gamma == pytest.approx(0.9)
    assert cfg.learner.hidden == [64, 64]
    assert cfg.actors.count == 5
    assert cfg.env.id == "Acrobot-v1"
    assert cfg.replay.capacity == Config().replay.capacity  # untouched keys keep defaults


OVERRIDE_CASES = [
    pytest.param("learner.hidden=[64,64]", "learner.hidden", [64, 64], id="list-of-int"),
    pytest.param("learner.hidden = [ 8 ]", "learner.hidden", [8], id="spaces-around"),
    pytest.param("learner.lr=1e-3", "learner.lr", 1e-3, id="float-exponent"),
    pytest.param("learner.gamma=1", "learner.gamma", 1.0, id="int-widens-to-float"),
    pytest.param("actors.count=4", "actors.count", 4, id="int"),
    pytest.param('env.id="MountainCar-v0"', "env.id", "MountainCar-v0", id="quoted-string"),
    pytest.param("env.id=MountainCar-v0", "env.id", "MountainCar-v0", id="bare-string"),
    pytest.param("run.stop_at_return=inf", "run.stop_at_return", math.inf, id="inf"),
    pytest.param("learner.device=cpu", "learner.device", "cpu", id="choice"),
    pytest.param('cluster.redis=["h:1", "h:2"]', "cluster.redis", ["h:1", "h:2"], id="list-of-str"),
]


@pytest.mark.parametrize(("override", "key", "expected"), OVERRIDE_CASES)
def test_set_override_is_parsed_as_a_typed_toml_value(override: str, key: str, expected: object) -> None:
    value = config.get(config.load(None, [override]), key)
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(
    "override",
    [
        pytest.param("learner.nope=1", id="unknown-field"),
        pytest.param("actors.speed=fast", id="unknown-field-string"),
    ],
)
def test_unknown_key_is_a_config_error_whose_problem_names_the_dotted_key(override: str) -> None:
    key = override.partition("=")[0]
    problems = problems_of([override])
    assert len(problems) == 1
    assert key in problems[0], f"problem line does not name {key!r}: {problems[0]!r}"
    assert "\n" not in problems[0]


def test_unknown_section_is_a_config_error_naming_the_section() -> None:
    problems = problems_of(["nosuch.key=1"])
    assert len(problems) == 1
    assert "nosuch" in problems[0]


WRONG_TYPE_CASES = [
    pytest.param("actors.count=2.5", "actors.count", id="float-for-int"),
    pytest.param("actors.count=true", "actors.count", id="bool-for-int"),
    pytest.param("learner.lr=fast", "learner.lr", id="string-for-float"),
    pytest.param("learner.hidden=64", "learner.hidden", id="int-for-list"),
    pytest.param('learner.hidden=[64, "x"]', "learner.hidden", id="bad-list-item"),
    pytest.param("env.id=3", "env.id", id="int-for-string"),
    pytest.param("learner.lr=true", "learner.lr", id="bool-for-float"),
]


@pytest.mark.parametrize(("override", "key"), WRONG_TYPE_CASES)
def test_wrong_type_is_reported_on_one_line_naming_key_and_expected_type(override: str, key: str) -> None:
    problems = problems_of([override])
    assert len(problems) == 1
    assert problems[0].startswith(key)
    assert "wrong type" in problems[0]


OUT_OF_RANGE_CASES = [
    pytest.param("actors.count=0", "actors.count", id="below-minimum"),
    pytest.param("replay.max_pending=-5", "replay.max_pending", id="negative"),
    pytest.param("replay.sample_wait_s=0", "replay.sample_wait_s", id="float-below-minimum"),
    pytest.param("learner.gamma=1.5", "learner.gamma", id="gamma-above-one"),
    pytest.param("learner.gamma=0", "learner.gamma", id="gamma-zero"),
    pytest.param("actors.eps_base=-0.1", "actors.eps_base", id="eps-negative"),
    pytest.param("learner.device=tpu", "learner.device", id="not-a-choice"),
    pytest.param("learner.hidden=[]", "learner.hidden", id="empty-hidden"),
    pytest.param("learner.hidden=[64, 0]", "learner.hidden", id="zero-width-layer"),
    pytest.param("replay.min_size=2000000", "replay.min_size", id="min-size-over-capacity"),
    pytest.param("learner.learners=0", "learner.learners", id="no-learner-rank"),
    pytest.param('cluster.learner_store="nohostport"', "cluster.learner_store", id="store-not-host-port"),
]


@pytest.mark.parametrize(("override", "key"), OUT_OF_RANGE_CASES)
def test_value_out_of_range_is_reported_naming_the_key(override: str, key: str) -> None:
    problems = problems_of([override])
    assert len(problems) == 1
    assert key in problems[0]


def test_every_problem_is_reported_at_once_one_per_line() -> None:
    problems = problems_of(["learner.nope=1", "actors.count=x", "learner.gamma=2", "replay.max_pending=0"])

    assert len(problems) == 4, problems
    assert any("nope" in p for p in problems)
    assert any(p.startswith("actors.count") and "wrong type" in p for p in problems)
    assert any("learner.gamma" in p for p in problems)
    assert any("replay.max_pending" in p for p in problems)
    assert all("\n" not in p for p in problems)


def test_malformed_override_without_equals_sign_is_a_problem() -> None:
    problems = problems_of(["actors.count"])
    assert len(problems) == 1
    assert "actors.count" in problems[0]


def test_missing_config_file_is_a_config_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    problems = problems_of([], path)
    assert problems == [f"config file {path} not found"]


def test_invalid_toml_file_is_a_config_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[learner\nlr = ")
    problems = problems_of([], path)
    assert len(problems) == 1
    assert str(path) in problems[0]


def test_section_given_a_scalar_is_a_problem(tmp_path: Path) -> None:
    path = tmp_path / "scalar.toml"
    path.write_text("learner = 3\n")
    problems = problems_of([], path)
    assert len(problems) == 1
    assert "learner" in problems[0]


def test_save_then_load_gives_back_the_same_tree(tmp_path: Path) -> None:
    cfg = config.load(
        None,
        [
            "learner.hidden=[64, 32, 16]",
            "learner.lr=0.0005",
            "run.name=demo",
            "run.stop_at_return=475",
            "run.time_limit_s=90",
            "cluster.redis=['127.0.0.1:7000', '127.0.0.1:7001']",
            "cluster.replay=['tcp://127.0.0.1:5555']",
            "actors.count=7",
        ],
    )
    path = tmp_path / "saved.toml"

    config.save(cfg, path)
    again = config.load(path)

    assert again == cfg
    assert config.to_dict(again) == config.to_dict(cfg)


def test_save_then_load_round_trips_the_infinite_default_stop_return(tmp_path: Path) -> None:
    path = tmp_path / "defaults.toml"
    config.save(Config(), path)
    assert config.load(path) == Config()


def test_env_kwargs_is_a_toml_table_that_set_and_save_round_trip(tmp_path: Path) -> None:
    cfg = config.load(
        None,
        ['env.kwargs={g = 9.81, render_fps = 30, mode = "hard", sizes = [1, 2], nested = {a = true}}'],
    )
    want = {"g": 9.81, "render_fps": 30, "mode": "hard", "sizes": [1, 2], "nested": {"a": True}}
    assert cfg.env.kwargs == want
    path = tmp_path / "saved.toml"
    config.save(cfg, path)
    assert config.load(path) == cfg
    assert config.load(path, ["env.kwargs.g=1.6"]).env.kwargs["g"] == 1.6  # a dotted key merges in
    assert Config().env.kwargs == {}
    config.save(Config(), path)
    assert config.load(path) == Config()  # the empty table round-trips too


def test_env_kwargs_from_a_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "cluster.toml"
    path.write_text('[env]\nid = "Pendulum-v1"\n\n[env.kwargs]\ng = 3.7\n')
    assert config.load(path).env.kwargs == {"g": 3.7}


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        pytest.param("env.kwargs=3", "env.kwargs = 3 has the wrong type: expected a table", id="not-a-table"),
        pytest.param("env.kwargs.render_mode=human", "env.kwargs.render_mode is set by", id="reserved"),
        pytest.param("env.kwargs.num_envs=4", "set actors.envs", id="reserved-vector"),
    ],
)
def test_bad_env_kwargs_are_one_line_problems(override: str, needle: str) -> None:
    problems = problems_of([override])
    assert len(problems) == 1 and needle in problems[0]


def test_atari_settings_in_env_kwargs_point_to_their_own_keys() -> None:
    atari = ["env.id=ALE/Pong-v5", "env.kwargs.frameskip=2", "env.kwargs.repeat_action_probability=0"]
    assert problems_of(atari) == [
        "env.kwargs.frameskip is set by canopy: set env.frame_skip",
        "env.kwargs.repeat_action_probability is set by canopy: set env.sticky_actions",
    ]
    # Not an Atari id: the env's own keyword.
    assert config.load(None, ["env.kwargs.frameskip=2"]).env.kwargs == {"frameskip": 2}


def test_env_kwargs_keys_must_be_strings() -> None:
    cfg = Config()
    cfg.env.kwargs = {1: 2}
    assert config.verify(cfg) == ["env.kwargs key 1 must be a string"]


def test_observation_normalization_is_refused_for_atari_frames() -> None:
    problems = problems_of(["env.id=ALE/Pong-v5", "env.normalize_obs=true"])
    assert problems == ["env.normalize_obs needs flat observations; Atari frames are pixels: set it to false"]
    assert config.load(None, ["env.normalize_obs=true"]).env.normalize_obs


def test_reward_clipping_is_on_by_default_and_can_be_turned_off() -> None:
    assert Config().env.clip_rewards
    assert not config.load(None, ["env.clip_rewards=false"]).env.clip_rewards


def test_sac_is_an_algorithm_choice_that_trains_one_model() -> None:
    cfg = config.load(None, ['learner.algorithm="sac"'])
    assert cfg.learner.algorithm == "sac" and not config.on_policy(cfg)
    assert problems_of(['learner.algorithm="sac"', "learner.models=2"]) == [
        'learner.models > 1 trains dqn populations only: set learner.algorithm = "dqn"'
    ]
    assert any("is not one of auto, dqn, td3, sac" in p for p in problems_of(['learner.algorithm="sacc"']))
