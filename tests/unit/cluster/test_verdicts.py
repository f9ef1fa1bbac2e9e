"""cluster/verdicts.py: when a run counts as solved, and how many env steps made the model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from canopy.cluster.verdicts import StepClock, Verdicts


def confirm(version: str, mean: float, episodes: int = 100, best: bool = True) -> dict[str, str]:
    return {
        "kind": "confirm",
        "version": version,
        "model": "0",
        "mean_return": f"{mean:.2f}",
        "std_return": "3.00",
        "min_return": f"{mean - 10:.2f}",
        "episodes": str(episodes),
        "best": "1" if best else "0",
    }


def test_a_run_is_solved_by_its_first_confirmed_verdict_at_the_threshold(tmp_path: Path) -> None:
    verdicts = Verdicts(tmp_path / "evals.jsonl", threshold=475.0)
    verdicts.on_confirm(confirm("1.100", 300.0), wall_s=10.0, env_steps=50_000)
    verdicts.on_confirm(confirm("1.150", 474.99), wall_s=11.0, env_steps=60_000)
    assert verdicts.solve is None
    verdicts.on_confirm(confirm("1.200", 480.0), wall_s=12.5, env_steps=70_000)
    verdicts.on_confirm(confirm("1.250", 500.0), wall_s=14.0, env_steps=80_000)
    verdicts.close()
    assert verdicts.solve == {
        "time_to_solve_s": 12.5,
        "env_steps_to_solve": 70_000,
        "solve_version": "1.200",
        "solve_eval_return": 480.0,
        "solve_eval_std": 3.0,
        "solve_eval_episodes": 100,
    }
    rows = [json.loads(line) for line in (tmp_path / "evals.jsonl").read_text().splitlines()]
    assert [r["version"] for r in rows] == ["1.100", "1.150", "1.200", "1.250"]
    assert rows[2] == {
        "wall_s": 12.5,
        "env_steps": 70_000,
        "version": "1.200",
        "model": 0,
        "mean": 480.0,
        "std": 3.0,
        "min": 470.0,
        "episodes": 100,
        "best": True,
    }


def test_without_a_threshold_nothing_is_ever_solved(tmp_path: Path) -> None:
    verdicts = Verdicts(tmp_path / "evals.jsonl", threshold=float("inf"))
    verdicts.on_confirm(confirm("1.100", 500.0), wall_s=1.0, env_steps=1)
    verdicts.close()
    assert verdicts.solve is None


def test_step_clock_interpolates_each_actor_and_sums() -> None:
    clock = StepClock()
    clock.observe(0, 100.0, 1_000)
    clock.observe(0, 102.0, 5_000)
    clock.observe(1, 101.0, 0)
    clock.observe(1, 103.0, 2_000)
    assert clock.steps_at(99.0) == 0  # before anyone reported
    assert clock.steps_at(101.0) == pytest.approx(3_000 + 0)
    assert clock.steps_at(102.0) == pytest.approx(5_000 + 1_000)


def test_step_clock_goes_on_at_the_last_rate_past_the_last_refresh_and_ignores_repeats() -> None:
    clock = StepClock()
    clock.observe(0, 10.0, 100)
    assert clock.steps_at(12.0) == 100  # one refresh: no rate yet
    clock.observe(0, 11.0, 300)
    clock.observe(0, 11.0, 999)  # the same refresh read again
    clock.observe(0, 10.5, 0)  # older than what we have
    assert clock.steps_at(12.0) == pytest.approx(500)


def test_step_clock_counts_from_the_actors_start_before_its_first_refresh() -> None:
    clock = StepClock()
    clock.observe(0, 110.0, 10_000, started_at=100.0)
    clock.observe(0, 110.0, 10_000, started_at=100.0)  # read twice: no second anchor
    assert clock.steps_at(105.0) == pytest.approx(5_000)  # was 0: no refresh yet at 105 s
    assert clock.steps_at(99.0) == 0


def test_step_clock_covers_a_time_once_every_actor_was_refreshed_after_it() -> None:
    clock = StepClock()
    assert not clock.covers(10.0)  # no actor seen: nothing is known
    clock.observe(0, 12.0, 500, started_at=9.0)
    clock.observe(1, 9.5, 100, started_at=9.0)
    assert clock.covers(9.5) and not clock.covers(10.0)  # actor 1's last refresh is before 10
    clock.observe(1, 11.0, 900)
    assert clock.covers(10.0)
    # A version published at 10.0, before anyone's refresh at it: counts on both sides of it.
    assert clock.steps_at(10.0) == pytest.approx(500 * 1 / 3 + 100 + 800 * 0.5 / 1.5)
