"""cluster/bench/zoo.py's canopy systems (--algorithms), --sb3-algos, the on-policy checks of
zoo_report.py and the random-action ceiling (ceiling.py).

Nothing here trains: canopy and SB3 runs are stand-ins built from synthetic summaries; only
the ceiling test steps real CartPole copies, for a fraction of a second.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from canopy.cluster.bench import ceiling, zoo, zoo_systems
from canopy.cluster.bench.zoo_report import env_checks, throughput_table
from canopy.cluster.cli import build_parser
from canopy.errors import UserError


# ---- --algorithms and --sb3-algos ----------------------------------------------------------
def test_the_cli_takes_algorithms_sb3_algos_and_the_ceiling_seconds() -> None:
    argv = ["bench", "zoo", "--json", "z.json", "--algorithms", "ppo,impala", "--sb3-algos", "ppo"]
    args = build_parser().parse_args([*argv, "--ceiling-s", "1.5"])
    assert (args.algorithms, args.sb3_algos, args.ceiling_s) == ("ppo,impala", "ppo", 1.5)
    assert zoo_systems.parse_algorithms(args.algorithms) == ["ppo", "impala"]
    assert zoo_systems.parse_sb3_algos(args.sb3_algos) == ["ppo"]
    defaults = build_parser().parse_args(["bench", "zoo", "--json", "z.json"])
    assert zoo_systems.parse_algorithms(defaults.algorithms) == ["auto"]
    assert zoo_systems.parse_sb3_algos(defaults.sb3_algos) is None  # every SB3 algorithm that fits
    assert defaults.ceiling_s > 0


def test_algorithm_lists_are_deduplicated_and_unknown_names_refused() -> None:
    assert zoo_systems.parse_algorithms(" PPO, auto,ppo ,,td3") == ["ppo", "auto", "td3"]
    for bad in ("", " , ", "ppo,a2c"):
        with pytest.raises(UserError, match="--algorithms"):
            zoo_systems.parse_algorithms(bad)
    with pytest.raises(UserError, match="--sb3-algos"):
        zoo_systems.parse_sb3_algos("ppo,impala")


def test_auto_keeps_the_name_canopy_and_every_other_algorithm_is_its_own_system() -> None:
    names = [zoo_systems.system_name(a) for a in ("auto", "ppo", "impala", "dqn", "td3")]
    assert names == ["canopy", "canopy-ppo", "canopy-impala", "canopy-dqn", "canopy-td3"]
    assert all(zoo_systems.is_canopy(n) for n in names) and not zoo_systems.is_canopy("sb3-ppo")
    # The algorithm goes first, so a --set of the user's still wins; auto adds nothing.
    assert zoo_systems.with_algorithm("ppo", ["a.b=1"]) == ['learner.algorithm="ppo"', "a.b=1"]
    assert zoo_systems.with_algorithm("auto", ["a.b=1"]) == ["a.b=1"]


def test_algorithms_that_cannot_fit_the_action_space_are_skipped_with_a_note() -> None:
    every = ["auto", "dqn", "td3", "ppo", "impala"]
    pendulum = zoo_systems.fit_systems(zoo.plan_env("Pendulum-v1", {}), every, None)
    assert pendulum["canopy_systems"] == {
        "canopy": "auto",
        "canopy-td3": "td3",
        "canopy-ppo": "ppo",
        "canopy-impala": "impala",
    }
    assert list(pendulum["skipped"]) == ["canopy-dqn"] and "discrete" in pendulum["skipped"]["canopy-dqn"]
    assert pendulum["algos"] == ["ppo", "sac", "td3"]  # no --sb3-algos: every one that fits
    cartpole = zoo_systems.fit_systems(zoo.plan_env("CartPole-v1", {}), every, ["ppo", "sac"])
    assert "canopy-td3" not in cartpole["canopy_systems"] and "canopy-dqn" in cartpole["canopy_systems"]
    assert set(cartpole["skipped"]) == {"canopy-td3", "sb3-sac"}
    assert cartpole["algos"] == ["ppo"]  # --sb3-algos ppo: SB3's DQN does not run


# ---- per-run figures ----------------------------------------------------------------------
def _summary(p50: float | None, p90: float | None, mx: float | None, steps: int, wall: float) -> dict:
    return {
        "policy_lag_p50": p50,
        "policy_lag_p90": p90,
        "policy_lag_p99": mx,
        "policy_lag_max": mx,
        "env_steps": steps,
        "wall_s": wall,
    }


def test_policy_lag_and_env_steps_per_second_come_from_summary_json() -> None:
    one = zoo_systems.seed_figures(_summary(1.0, 3.0, 7.0, 20_000, 10.0))
    assert one == {"policy_lag": {"p50": 1.0, "p90": 3.0, "p99": 7.0, "max": 7.0}, "env_steps_per_s": 2000.0}
    # An older canopy (no lag keys) or a crash (no summary): None, never zero.
    assert zoo_systems.seed_figures({}) == {
        "policy_lag": dict.fromkeys(zoo_systems.LAG_KEYS),
        "env_steps_per_s": None,
    }
    rows = [
        zoo_systems.seed_figures(_summary(1.0, 3.0, 7.0, 20_000, 10.0)),
        zoo_systems.seed_figures(_summary(2.0, 5.0, 6.0, 30_000, 10.0)),
        zoo_systems.seed_figures(_summary(4.0, 4.0, 9.0, 10_000, 10.0)),
        {},  # a seed that crashed before summary.json
    ]
    over = zoo_systems.canopy_figures(rows)
    assert over["policy_lag"] == {"median_p50": 2.0, "max_p90": 5.0, "max_max": 9.0, "seeds": 3}
    assert over["env_steps_per_s"] == 2000.0
    assert zoo_systems.canopy_figures([{}])["policy_lag"]["median_p50"] is None


# ---- checks ---------------------------------------------------------------------------------
def _row(seed: int, score: float, solve_s: float | None, steps_to_solve: int | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {"seed": seed, "env_steps": 100_000, "solved": solve_s is not None}
    row |= {"time_to_solve_s": solve_s, "env_steps_to_solve": steps_to_solve}
    row |= {"score": {"mean_return": score}, "newest": {"mean_return": score}}
    row |= zoo_systems.seed_figures(_summary(1.0, 2.0, 4.0, 100_000, 20.0))
    return row


def _canopy(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {**zoo.summarize(rows, len(rows), newest=True), **zoo_systems.canopy_figures(rows)}


def _by_name(checks: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {c["name"].split(": ", 1)[1]: c for c in checks}


def test_ppo_on_cartpole_solving_every_seed_sooner_than_sb3_ppo_meets_its_checks() -> None:
    systems = {
        "canopy-ppo": _canopy([_row(0, 500.0, 30.0, 60_000), _row(1, 490.0, 40.0, 80_000)]),
        "sb3-ppo": zoo.summarize([_row(0, 500.0, 50.0, 90_000), _row(1, 500.0, 70.0, 95_000)], 2),
    }
    checks = _by_name(env_checks("CartPole-v1", 475.0, systems, True, ceiling=9000.0))
    assert set(checks) == {
        "ppo_confirmed_solve_every_seed",
        "ppo_median_time_to_solve_vs_sb3_ppo",
        "ppo_median_env_steps_to_solve",
        "ppo_policy_lag",
        "ppo_throughput_vs_random_actions",
    }  # no "canopy" system ran: none of its checks
    solve, timing = checks["ppo_confirmed_solve_every_seed"], checks["ppo_median_time_to_solve_vs_sb3_ppo"]
    assert (solve["value"], solve["baseline"], solve["met"]) == (2, 2, True)
    assert (timing["value"], timing["baseline"], timing["met"]) == (35.0, 60.0, True)
    steps = checks["ppo_median_env_steps_to_solve"]
    assert (steps["value"], steps["baseline"], steps["met"]) == (70_000, 92_500, True)
    lag, rate = checks["ppo_policy_lag"], checks["ppo_throughput_vs_random_actions"]
    assert (lag["value"], lag["baseline"], lag["met"]) == (1.0, {"p90": 2.0, "max": 4.0}, True)
    assert (rate["value"], rate["baseline"], rate["met"]) == (5000.0, 9000.0, True)


def test_ppo_on_cartpole_missing_a_seed_or_slower_than_sb3_ppo_fails() -> None:
    slow = [_row(0, 500.0, 80.0, 160_000), _row(1, 300.0, None), _row(2, 500.0, 90.0, 170_000)]
    systems = {"canopy-ppo": _canopy(slow), "sb3-ppo": zoo.summarize([_row(0, 500.0, 50.0, 90_000)], 1)}
    checks = _by_name(env_checks("CartPole-v1", 475.0, systems, True))
    assert checks["ppo_confirmed_solve_every_seed"]["met"] is False
    timing = checks["ppo_median_time_to_solve_vs_sb3_ppo"]
    assert (timing["value"], timing["baseline"], timing["met"]) == (90.0, 50.0, False)
    assert checks["ppo_median_env_steps_to_solve"]["met"] is False  # 170,000 > 150,000
    # Without SB3 PPO in the run there is nothing to beat: no pass, a null baseline.
    alone = _by_name(env_checks("CartPole-v1", 475.0, {"canopy-ppo": _canopy(slow[:1])}, True))
    assert alone["ppo_median_time_to_solve_vs_sb3_ppo"]["met"] is False
    assert alone["ppo_median_time_to_solve_vs_sb3_ppo"]["baseline"] is None


def test_impala_must_solve_every_seed_and_reports_its_time_and_steps() -> None:
    solved = [_row(0, 480.0, 60.0, 100_000), _row(1, 490.0, 80.0, 120_000)]
    sb3 = zoo.summarize([_row(0, 500.0, 50.0, 90_000)], 1)
    check = _by_name(
        env_checks("Acrobot-v1", -100.0, {"canopy-impala": _canopy(solved), "sb3-ppo": sb3}, True)
    )
    got = check["impala_confirmed_solve_every_seed"]
    assert got["value"] == {
        "seeds_solved": 2,
        "median_time_to_solve_s": 70.0,
        "median_env_steps_to_solve": 110_000,
    }
    assert got["met"] and got["baseline"]["median_time_to_solve_s"] == 50.0
    assert {"impala_policy_lag", "impala_throughput_vs_random_actions"} <= set(check)
    missed = _canopy([solved[0], _row(1, 100.0, None)])
    check = _by_name(env_checks("Acrobot-v1", -100.0, {"canopy-impala": missed}, False))
    assert not check["impala_confirmed_solve_every_seed"]["met"]
    assert check["impala_confirmed_solve_every_seed"]["baseline"] is None  # no SB3 in the run
    # No threshold: no solve to check, only the reported figures.
    assert "impala_confirmed_solve_every_seed" not in _by_name(
        env_checks("Foo-v0", None, {"canopy-impala": missed}, False)
    )


def test_ppo_on_a_box_env_must_match_sb3_ppo_at_the_same_budget() -> None:
    sb3 = zoo.summarize([_row(0, -300.0, None), _row(1, -250.0, None)], 2)

    def box(score: float) -> dict[str, Any]:
        systems = {"canopy-ppo": _canopy([_row(0, score, None), _row(1, score, None)]), "sb3-ppo": sb3}
        return _by_name(env_checks("Pendulum-v1", -200.0, systems, True, action_space="box"))

    better, worse = box(-260.0)["ppo_box_vs_sb3_ppo"], box(-290.0)["ppo_box_vs_sb3_ppo"]
    assert (better["value"], better["baseline"], better["met"]) == (-260.0, -275.0, True)
    assert (worse["met"], "ppo_confirmed_solve_every_seed" in box(-260.0)) == (False, False)
    assert not _by_name(env_checks("Pendulum-v1", -200.0, {"canopy-ppo": sb3}, False, action_space="box"))[
        "ppo_box_vs_sb3_ppo"
    ]["met"]


def test_on_policy_checks_are_only_there_for_systems_that_ran() -> None:
    canopy = _canopy([_row(0, 500.0, 20.0, 20_000)])
    checks = env_checks("CartPole-v1", 475.0, {"canopy": canopy}, False)
    assert len(checks) == 4 and not any("ppo" in c["name"] or "impala" in c["name"] for c in checks)
    dqn = _by_name(env_checks("CartPole-v1", 475.0, {"canopy-dqn": canopy}, False))
    assert dqn == {}  # off-policy systems report their figures in the table, not as checks


def test_the_throughput_table_lists_every_canopy_system_beside_the_ceiling() -> None:
    from rich.console import Console

    block = {
        "random_actions_env_steps_per_s": 90_000.0,
        "systems": {
            "canopy-ppo": {"summary": _canopy([_row(0, 500.0, 20.0)])},
            "sb3-ppo": {"summary": zoo.summarize([], 1)},
        },
    }
    console = Console(width=120, record=True)
    console.print(throughput_table("CartPole-v1", block))
    text = console.export_text()
    assert "canopy-ppo" in text and "5,000" in text and "90,000" in text and "sb3-ppo" not in text
    assert throughput_table("CartPole-v1", {"systems": {"sb3-ppo": block["systems"]["sb3-ppo"]}}) is None


# ---- the whole bench, with stand-ins -------------------------------------------------------
def test_main_runs_each_algorithm_as_its_own_system_and_only_the_sb3_algos_asked_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    canopy_runs: list[tuple[list[str], str]] = []
    sb3_runs: list[str] = []

    def fake_canopy(plan: dict, seed: int, budget_s: float, sets: list, run_dir: Path, show: Any) -> dict:
        canopy_runs.append((sets, run_dir.name))
        return _row(seed, 500.0, 20.0, 40_000)

    def fake_sb3(plan: dict, algo: str, seed: int, *_: Any) -> dict:
        sb3_runs.append(algo)
        return _row(seed, 500.0, 60.0, 90_000)

    monkeypatch.setattr(zoo, "sb3_available", lambda: True)
    monkeypatch.setattr(zoo, "run_canopy", fake_canopy)
    monkeypatch.setattr(zoo, "run_sb3", fake_sb3)
    monkeypatch.setattr(zoo.ceiling, "random_actions_rate", lambda *_: {"env_steps_per_s": 8000.0})
    out = tmp_path / "zoo.json"
    argv = ["bench", "zoo", "--envs", "CartPole-v1", "--seeds", "1", "--json", str(out)]
    argv += ["--algorithms", "ppo,impala,td3", "--sb3-algos", "ppo", "--work-dir", str(tmp_path / "runs")]
    assert zoo.main(build_parser().parse_args([*argv, "--set", "actors.count=3"])) == 0
    assert canopy_runs == [
        (['learner.algorithm="ppo"', "actors.count=3"], "canopy-ppo-seed-0"),
        (['learner.algorithm="impala"', "actors.count=3"], "canopy-impala-seed-0"),
    ]
    assert sb3_runs == ["ppo"]
    block = json.loads(out.read_text())["envs"]["CartPole-v1"]
    assert list(block["systems"]) == ["canopy-ppo", "canopy-impala", "sb3-ppo"]
    assert "canopy-td3" in block["skipped"] and block["random_actions_env_steps_per_s"] == 8000.0
    summary = block["systems"]["canopy-ppo"]["summary"]
    assert (summary["seeds_solved"], summary["env_steps_per_s"], summary["newest_mean"]) == (1, 5000.0, 500.0)
    checks = _by_name(json.loads(out.read_text())["checks"])
    assert checks["ppo_median_time_to_solve_vs_sb3_ppo"]["met"]
    assert checks["impala_throughput_vs_random_actions"]["baseline"] == 8000.0
    assert "canopy hand-over return vs strongest SB3 at equal budget" not in checks


# ---- the ceiling -----------------------------------------------------------------------------
def test_the_ceiling_has_the_actors_of_an_on_policy_run() -> None:
    count, envs, env_cfg = ceiling.actors_of("Pendulum-v1", [])
    assert (count, envs, env_cfg.id) == (2, 8, "Pendulum-v1")  # ppo's actors.envs default is 8
    assert ceiling.actors_of("CartPole-v1", ["actors.count=3", "actors.envs=2"])[:2] == (3, 2)


def test_the_ceiling_sums_concurrent_random_action_processes() -> None:
    got = ceiling.random_actions_rate("CartPole-v1", ["actors.count=2", "actors.envs=2"], 0.2)
    assert (got["processes"], got["envs_per_process"], len(got["per_process"])) == (2, 2, 2)
    assert (
        got["env_steps_per_s"] == pytest.approx(sum(got["per_process"]), abs=1) and got["env_steps_per_s"] > 0
    )


def test_a_failed_or_skipped_ceiling_is_told_and_the_bench_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    assert zoo.measure_ceiling("CartPole-v1", [], 0)["random_actions_env_steps_per_s"] is None

    def broken(*_: Any) -> dict:
        raise RuntimeError("2 of 2 random-action workers did not report")

    monkeypatch.setattr(zoo.ceiling, "random_actions_rate", broken)
    got = zoo.measure_ceiling("CartPole-v1", [], 1.0)
    assert (
        got["random_actions_env_steps_per_s"] is None and "did not report" in got["random_actions"]["error"]
    )


def test_sac_must_match_sb3_sac_solve_every_seed_and_beat_canopys_td3() -> None:
    sb3_sac = zoo.summarize([_row(0, -160.0, 40.0), _row(1, -150.0, 50.0)], 2)

    def checks(score: float, sac_solve: list[float | None], td3_solve: list[float | None]) -> dict:
        sac = _canopy([_row(i, score, t) for i, t in enumerate(sac_solve)])
        td3 = _canopy([_row(i, -170.0, t) for i, t in enumerate(td3_solve)])
        systems = {"canopy-sac": sac, "canopy-td3": td3, "sb3-sac": sb3_sac}
        return _by_name(env_checks("Pendulum-v1", -200.0, systems, True, action_space="box"))

    good = checks(-150.0, [10.0, 12.0], [20.0, 30.0])
    assert [good[k]["met"] for k in ("sac_vs_sb3_sac", "sac_confirmed_solve_every_seed")] == [True, True]
    assert (
        good["sac_median_time_to_solve_vs_td3"]["value"],
        good["sac_median_time_to_solve_vs_td3"]["met"],
    ) == (
        11.0,
        True,
    )
    bad = checks(-160.0, [10.0, None], [5.0, 6.0])
    assert not any(bad[k]["met"] for k in bad), bad
    # A TD3 that never solves is beaten by any SAC solve; no canopy-sac run: no sac checks.
    assert checks(-150.0, [10.0, 12.0], [None, None])["sac_median_time_to_solve_vs_td3"]["met"]
    assert not any(
        "sac" in c["name"] for c in env_checks("Pendulum-v1", -200.0, {}, True, action_space="box")
    )
