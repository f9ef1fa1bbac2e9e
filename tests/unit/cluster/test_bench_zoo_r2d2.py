"""cluster/bench/zoo_report.py's r2d2 checks and the zoo bench's handling of canopy's own
partially observed task. Nothing here trains: the runs are synthetic summaries."""

from __future__ import annotations

from typing import Any

from canopy.cluster.bench import zoo, zoo_systems
from canopy.cluster.bench.zoo_report import env_checks

ENV = "canopy/CartPoleNoVelocity-v1"


def _row(seed: int, score: float, solve_s: float | None, steps: int | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {"seed": seed, "env_steps": 400_000, "solved": solve_s is not None}
    row |= {"time_to_solve_s": solve_s, "env_steps_to_solve": steps}
    return row | {"score": {"mean_return": score}, "newest": {"mean_return": score}}


def _system(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return zoo.summarize(rows, len(rows), newest=True)


def _by_name(checks: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {c["name"].split(": ", 1)[1]: c for c in checks}


def test_the_zoo_bench_plans_canopys_own_task_with_its_threshold_and_r2d2_fits_it() -> None:
    plan = zoo.plan_env(ENV, {})
    assert (plan["action_space"], plan["threshold"]) == ("discrete", 400.0)
    fitted = zoo_systems.fit_systems(plan, zoo_systems.parse_algorithms("r2d2,dqn"), None)
    assert fitted["canopy_systems"] == {"canopy-r2d2": "r2d2", "canopy-dqn": "dqn"}
    box = zoo_systems.fit_systems(zoo.plan_env("Pendulum-v1", {}), ["r2d2"], None)
    assert "canopy-r2d2" in box["skipped"]


def test_r2d2_solving_every_seed_where_dqn_stays_below_meets_its_checks() -> None:
    systems = {
        "canopy-r2d2": _system([_row(0, 420.0, 230.0, 380_000), _row(1, 430.0, 150.0, 250_000)]),
        "canopy-dqn": _system([_row(0, 120.0, None), _row(1, 90.0, None)]),
    }
    checks = _by_name(env_checks(ENV, 400.0, systems, False))
    assert set(checks) == {"r2d2_confirmed_solve_every_seed", "dqn_below_r2d2_without_memory"}
    solve, below = checks["r2d2_confirmed_solve_every_seed"], checks["dqn_below_r2d2_without_memory"]
    assert solve["met"] and solve["value"]["seeds_solved"] == 2
    assert solve["value"]["median_time_to_solve_s"] == 190.0
    assert solve["baseline"]["seeds_solved"] == 0  # dqn's figures beside it
    assert (below["value"], below["baseline"], below["met"]) == (105.0, 425.0, True)


def test_an_unsolved_r2d2_seed_or_a_dqn_that_solves_too_fails() -> None:
    systems = {
        "canopy-r2d2": _system([_row(0, 420.0, 230.0, 380_000), _row(1, 200.0, None)]),
        "canopy-dqn": _system([_row(0, 450.0, 100.0, 90_000)]),
    }
    checks = _by_name(env_checks(ENV, 400.0, systems, False))
    assert not checks["r2d2_confirmed_solve_every_seed"]["met"]
    assert not checks["dqn_below_r2d2_without_memory"]["met"]
    alone = _by_name(env_checks(ENV, 400.0, {"canopy-r2d2": systems["canopy-r2d2"]}, False))
    assert set(alone) == {"r2d2_confirmed_solve_every_seed"}  # dqn did not run: no comparison
