"""cluster/bench/zoo.py and sb3.py: arguments, thresholds, zoo hyperparameters, figures and checks.

Nothing here trains: the canopy runs are stand-ins, so the whole file takes a few seconds.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest

from canopy.cluster.bench import sb3, zoo
from canopy.cluster.cli import build_parser
from canopy.errors import UserError


def test_the_cli_parses_the_issue_command() -> None:
    argv = "bench zoo --envs CartPole-v1,Acrobot-v1 --seeds 2 --budget-s 30 --json z.json --plot z.png"
    args = build_parser().parse_args([*argv.split(), "--threshold", "Pendulum-v1=-150", "--threshold", "X=1"])
    assert (args.bench, args.seeds, args.budget_s, args.plot) == ("zoo", 2, 30.0, "z.png")
    assert zoo.parse_envs(args.envs) == ["CartPole-v1", "Acrobot-v1"]
    assert zoo.parse_thresholds(args.threshold) == {"Pendulum-v1": -150.0, "X": 1.0}
    defaults = build_parser().parse_args(["bench", "zoo", "--json", "z.json"])
    assert zoo.parse_envs(defaults.envs) == ["CartPole-v1", "Pendulum-v1"]
    assert (defaults.seeds, defaults.budget_s, defaults.skip_sb3, defaults.sb3_threads) == (
        3,
        120.0,
        False,
        1,
    )


@pytest.mark.parametrize("bad", ["Pendulum-v1", "=3", "Pendulum-v1=high"])
def test_a_malformed_threshold_is_a_user_error(bad: str) -> None:
    with pytest.raises(UserError, match="ENV=RETURN"):
        zoo.parse_thresholds([bad])


def test_envs_are_deduplicated_and_an_empty_list_refused() -> None:
    assert zoo.parse_envs(" CartPole-v1, ,CartPole-v1,Pendulum-v1") == ["CartPole-v1", "Pendulum-v1"]
    with pytest.raises(UserError):
        zoo.parse_envs(" , ")


def test_thresholds_come_from_gymnasium_then_the_default_table_then_the_flag() -> None:
    cartpole = zoo.plan_env("CartPole-v1", {})
    assert cartpole["threshold"] == 475.0 and "gymnasium" in cartpole["threshold_source"]
    assert (cartpole["action_space"], cartpole["algos"]) == ("discrete", ["ppo", "dqn"])
    pendulum = zoo.plan_env("Pendulum-v1", {})
    assert pendulum["threshold"] == -200.0 and "default" in pendulum["threshold_source"]
    assert (pendulum["action_space"], pendulum["algos"]) == ("box", ["ppo", "sac", "td3"])
    assert zoo.plan_env("Pendulum-v1", {"Pendulum-v1": -150.0})["threshold"] == -150.0
    assert zoo.threshold_of("Foo-v0", None, {})[0] is None


def test_an_unknown_env_is_a_user_error() -> None:
    with pytest.raises(UserError, match="cannot make"):
        zoo.plan_env("NoSuchEnv-v9", {})


def test_zoo_hyperparameters_are_the_zoo_files_and_unlisted_envs_fall_back_with_a_note() -> None:
    ppo, source = sb3.zoo_hyperparams("ppo", "CartPole-v1")
    assert "ppo.yml" in source
    assert (ppo["n_envs"], ppo["n_steps"], ppo["n_epochs"], ppo["learning_rate"]) == (8, 32, 20, "lin_0.001")
    dqn, _ = sb3.zoo_hyperparams("dqn", "CartPole-v1")
    assert (dqn["n_timesteps"], dqn["train_freq"], dqn["gradient_steps"]) == (5e4, 256, 128)
    td3, _ = sb3.zoo_hyperparams("td3", "Pendulum-v1")
    assert (td3["learning_starts"], td3["policy_kwargs"]) == (10000, {"net_arch": [400, 300]})
    assert sb3.zoo_hyperparams("sac", "Pendulum-v1")[0] == {"n_timesteps": 20000, "learning_rate": 1e-3}
    fallback, note = sb3.zoo_hyperparams("sac", "Walker2d-v5")
    assert fallback == {"n_timesteps": 1e6} and "no entry" in note
    # The table is copied, not shared: a caller's edits do not leak into the next run.
    ppo["n_envs"] = 1
    assert sb3.zoo_hyperparams("ppo", "CartPole-v1")[0]["n_envs"] == 8


def test_the_bench_splits_its_own_keys_from_the_models() -> None:
    pytest.importorskip("stable_baselines3")
    own, kwargs = sb3.split_hyperparams(sb3.zoo_hyperparams("ppo", "CartPole-v1")[0])
    assert own == {"n_envs": 8, "n_timesteps": 1e5}
    # lin_X is the zoo's linear_schedule: X * progress_remaining
    assert kwargs["learning_rate"](1.0) == pytest.approx(1e-3)
    assert kwargs["clip_range"](0.25) == pytest.approx(0.05)
    assert kwargs["n_steps"] == 32
    own, kwargs = sb3.split_hyperparams(sb3.zoo_hyperparams("td3", "Pendulum-v1")[0])
    noise = sb3.action_noise(own, 1)
    assert type(noise).__name__ == "NormalActionNoise" and "noise_std" not in kwargs
    assert sb3.action_noise({}, 1) is None


def test_screens_are_spread_over_the_schedule() -> None:
    assert sb3.screen_every(100_000) == 4000
    assert sb3.screen_every(20_000) == sb3.MIN_SCREEN_EVERY


def test_scoring_episodes_are_seeded_as_canopy_eval_seeds_them() -> None:
    def push_left(obs: np.ndarray) -> np.ndarray:
        return np.zeros(len(obs), dtype=np.int64)

    batched = sb3.run_episodes("CartPole-v1", push_left, episodes=7, seed=123, batch=3)
    env = gym.make("CartPole-v1")
    one_by_one = []
    for i in range(7):
        env.reset(seed=123 + i)
        total, done = 0.0, False
        while not done:
            _, reward, terminated, truncated, _ = env.step(0)
            total += float(reward)
            done = terminated or truncated
        one_by_one.append(total)
    assert batched == one_by_one


def test_the_first_confirmed_evaluation_at_the_threshold_is_the_solve(tmp_path: Path) -> None:
    path = tmp_path / "evals.jsonl"
    rows = [
        {"wall_s": 5.0, "env_steps": 100, "version": "1.1", "mean": 480.0, "episodes": 10},
        {"wall_s": 9.0, "env_steps": 900, "version": "1.2", "mean": 300.0, "episodes": 100},
        {"wall_s": 12.0, "env_steps": 1200, "version": "1.3", "mean": 476.0, "episodes": 100},
    ]
    path.write_text("\n".join(map(json.dumps, rows)) + "\n{cut short")
    evals = zoo.read_jsonl(path)
    assert evals == rows
    assert zoo.first_solve(evals, 475.0) == rows[2]  # the 10-episode one is no confirmation
    assert zoo.first_solve(evals, None) is None
    assert zoo.read_jsonl(tmp_path / "missing.jsonl") is None
    assert zoo.first_solve(None, 475.0) is None


def test_a_median_needs_most_seeds_solved() -> None:
    assert zoo.median_or_none([10.0, None, 30.0]) == 30.0
    assert zoo.median_or_none([10.0, None, None]) is None
    assert zoo.median_or_none([]) is None


def _row(seed: int, score: float | None, solve: float | None = None, newest: float | None = None) -> dict:
    row: dict[str, Any] = {"seed": seed, "env_steps": 1000, "solved": solve is not None}
    row["time_to_solve_s"], row["env_steps_to_solve"] = solve, None if solve is None else int(solve * 1000)
    if score is not None:
        row["score"] = {"mean_return": score}
    if newest is not None:
        row["newest"] = {"mean_return": newest}
    return row


def test_a_seed_without_a_score_leaves_the_mean_empty() -> None:
    s = zoo.summarize([_row(0, 500.0, 20.0, 500.0), _row(1, None)], 2, newest=True)
    assert s["handed_over_mean"] is None and s["seeds_scored"] == 1 and s["newest_min"] is None
    s = zoo.summarize([_row(0, 500.0, 20.0, 490.0), _row(1, 450.0, None, 480.0)], 2, newest=True)
    assert (s["handed_over_mean"], s["handed_over_min"], s["newest_min"]) == (475.0, 450.0, 480.0)
    assert (s["seeds_solved"], s["median_time_to_solve_s"]) == (1, None)


def _systems(canopy: list[dict], **algos: list[dict]) -> dict[str, dict]:
    out = {"canopy": zoo.summarize(canopy, len(canopy), newest=True)}
    out.update({f"sb3-{name}": zoo.summarize(rows, len(rows)) for name, rows in algos.items()})
    return out


def test_canopy_passes_by_beating_the_strongest_sb3_or_by_both_solving() -> None:
    canopy = [_row(0, 480.0, 20.0, 490.0), _row(1, 490.0, 30.0, 500.0)]
    systems = _systems(
        canopy, ppo=[_row(0, 500.0, 40.0), _row(1, 500.0, 50.0)], dqn=[_row(0, 100.0), _row(1, 90.0)]
    )
    checks = {c["name"].split(": ", 1)[1]: c for c in zoo.env_checks("CartPole-v1", 475.0, systems, True)}
    first = checks["canopy hand-over return vs strongest SB3 at equal budget"]
    assert (first["value"], first["baseline"], first["met"]) == (485.0, 500.0, True)  # both >= 475
    assert "sb3-ppo" in first["goal"]
    assert checks["newest version's 100-episode mean on every seed"]["met"]
    assert checks["median env steps to a confirmed solve"]["value"] == 25_000
    timing = checks["median time from process start to a confirmed solve vs SB3 PPO"]
    assert (timing["value"], timing["baseline"], timing["met"]) == (25.0, 45.0, True)
    # Without the threshold, only beating the strongest counts.
    assert not zoo.env_checks("Acrobot-v1", None, systems, True)[0]["met"]


def test_without_sb3_its_checks_fail_with_a_null_baseline() -> None:
    canopy = [_row(0, -150.0, 30.0), _row(1, -180.0, 40.0)]
    checks = zoo.env_checks("Pendulum-v1", -200.0, {"canopy": zoo.summarize(canopy, 2)}, False)
    versus, every_seed = checks
    assert (versus["met"], versus["baseline"]) == (False, None)
    assert (every_seed["value"], every_seed["met"], every_seed["baseline"]) == (2, True, None)
    cartpole = [_row(0, 500.0, 20.0, 500.0)]
    checks = zoo.env_checks("CartPole-v1", 475.0, {"canopy": zoo.summarize(cartpole, 1, newest=True)}, False)
    assert [c["met"] for c in checks] == [False, True, True, False]
    assert all(c["baseline"] is None for c in checks)


def test_main_without_sb3_says_how_to_install_it_and_runs_canopy_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def fake_canopy(plan: dict, seed: int, budget_s: float, sets: list, run_dir: Path, show: Any) -> dict:
        row = _row(seed, 500.0, 12.0, 500.0)
        row["curve"] = [
            {"wall_s": 3.0, "env_steps": 500, "mean": 20.0},
            {"wall_s": 9.0, "env_steps": 9000, "mean": 500.0},
        ]
        row["confirms"] = [{"wall_s": 12.0, "env_steps": 12000, "mean": 500.0}]
        return row

    def no_sb3(*_: Any) -> dict:
        raise AssertionError("SB3 must not run when it is missing")

    monkeypatch.setattr(zoo, "sb3_available", lambda: False)
    monkeypatch.setattr(zoo, "run_canopy", fake_canopy)
    monkeypatch.setattr(zoo.ceiling, "random_actions_rate", lambda *_: {"env_steps_per_s": 1000.0})
    monkeypatch.setattr(zoo, "run_sb3", no_sb3)
    out, png = tmp_path / "zoo.json", tmp_path / "zoo.png"
    argv = ["bench", "zoo", "--envs", "CartPole-v1", "--seeds", "2", "--json", str(out), "--plot", str(png)]
    args = build_parser().parse_args([*argv, "--work-dir", str(tmp_path / "runs")])
    assert zoo.main(args) == 0
    err = capsys.readouterr().err
    assert "pip install 'canopy-rl[bench]'" in err and err.count("stable-baselines3 is not installed") == 1
    doc = json.loads(out.read_text())
    assert doc["bench"] == "zoo" and doc["sb3"] == {
        "installed": False,
        "ran": False,
        "torch_threads": 1,
        "message": zoo.SB3_MISSING,
    }
    block = doc["envs"]["CartPole-v1"]
    assert (
        block["systems"]["sb3-ppo"]["seeds"] == []
        and block["systems"]["canopy"]["summary"]["seeds_solved"] == 2
    )
    assert set(block["sb3_hyperparameters"]) == {"ppo", "dqn"}
    assert [c["met"] for c in doc["checks"]] == [False, True, True, False]
    assert png.stat().st_size > 0 and math.isclose(block["threshold"], 475.0)


def test_the_sb3_process_takes_the_arguments_the_bench_passes() -> None:
    args = sb3.parse_args(
        ["--env", "Pendulum-v1", "--algo", "td3", "--budget-s", "5", "--started-at", "12.5"]
    )
    assert (args.threshold, args.score_episodes, args.threads, args.started_at) == (None, 100, 1, 12.5)
    assert isinstance(args, argparse.Namespace)
