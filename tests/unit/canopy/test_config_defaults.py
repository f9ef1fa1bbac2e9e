"""canopy/config_defaults.py and the on-policy checks of canopy/config.py: an algorithm brings
its own defaults, what the TOML file or `--set` names wins, and settings an on-policy
learner cannot work with are one-line problems."""

from __future__ import annotations

from pathlib import Path

import pytest

from canopy import config
from canopy.config_defaults import ALGORITHM_DEFAULTS, UNROLLS
from canopy.errors import ConfigError


@pytest.mark.parametrize("algorithm", ["ppo", "impala"])
def test_an_on_policy_algorithm_brings_its_defaults_and_a_queue(algorithm: str) -> None:
    cfg = config.load(None, [f'learner.algorithm="{algorithm}"'])
    assert config.on_policy(cfg)
    for key, value in ALGORITHM_DEFAULTS[algorithm].items():
        assert config.get(cfg, key) == value, key
    queue = [e for e in cfg.replay.extra_tables if e.startswith(f"{UNROLLS}:")]
    assert len(queue) == 1 and queue[0].split(":")[1:4] == ["fifo", "fifo", "1"]


def test_dqn_keeps_the_trees_defaults() -> None:
    dqn = config.load(None, ['learner.algorithm="dqn"'])
    dqn.learner.algorithm = "auto"
    assert dqn == config.load(None, [])
    assert not config.on_policy(config.load(None, []))


def test_what_the_file_or_an_override_sets_wins_over_the_algorithms_default(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[learner]\nalgorithm = "ppo"\nlr = 3e-4\n')
    cfg = config.load(path, ["learner.epochs=4"])
    assert (cfg.learner.lr, cfg.learner.epochs) == (3e-4, 4)
    assert cfg.learner.gae_lambda == ALGORITHM_DEFAULTS["ppo"]["learner.gae_lambda"]  # untouched: the default


def test_saving_and_loading_a_resolved_on_policy_config_gives_the_same_tree(tmp_path: Path) -> None:
    cfg = config.load(None, ['learner.algorithm="impala"', "learner.lr=1e-4"])
    config.save(cfg, tmp_path / "saved.toml")
    assert config.load(tmp_path / "saved.toml") == cfg


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (
            ['replay.sampler="prioritized"'],
            "replay.sampler = 'prioritized' does not fit learner.algorithm = 'ppo'",
        ),
        (
            ["replay.extra_tables=[]"],
            "replay.extra_tables needs exactly one entry 'unrolls:fifo:fifo:1:<capacity>'",
        ),
        (['replay.extra_tables=["unrolls:uniform:fifo:1:64"]'], "reads unrolls from a queue"),
        (['replay.extra_tables=["unrolls:fifo:fifo:1:4"]'], "the unrolls queue holds 4 unrolls"),
        (["learner.minibatch_size=100000"], "exceeds a batch's 256 env steps"),
        (["learner.models=2"], "learner.models > 1 trains dqn populations only"),
    ],
)
def test_settings_an_on_policy_learner_cannot_work_with_are_one_line_problems(
    overrides: list[str], needle: str
) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(None, ['learner.algorithm="ppo"', *overrides])
    problems = info.value.problems
    assert any(needle in p for p in problems), problems
    assert all("\n" not in p for p in problems)


def test_r2d2_brings_its_defaults_a_prioritized_main_table_and_no_queue() -> None:
    cfg = config.load(None, ['learner.algorithm="r2d2"'])
    assert not config.on_policy(cfg)
    for key, value in ALGORITHM_DEFAULTS["r2d2"].items():
        assert config.get(cfg, key) == value, key
    assert cfg.replay.sampler == "prioritized" and not cfg.replay.extra_tables


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["learner.overlap=40"], "learner.overlap = 40 must be below learner.unroll_length = 40"),
        (["learner.burn_in=40", "learner.overlap=39"], "learner.burn_in = 40 leaves nothing to learn from"),
        (["learner.burn_in=25"], "learner.burn_in = 25 exceeds learner.overlap = 20"),
        (["env.normalize_obs=true"], "env.normalize_obs does not fit r2d2"),
    ],
)
def test_r2d2_settings_its_sequences_cannot_work_with_are_one_line_problems(
    overrides: list[str], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(None, ['learner.algorithm="r2d2"', *overrides])
    assert any(line.startswith(message) for line in info.value.problems), info.value.problems
