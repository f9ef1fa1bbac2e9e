"""What `canopy up` makes of the evaluator's verdicts: the solve, evals.jsonl, env steps per version.

Place in the data flow: the evaluator (actors/evaluator.py) appends `confirm` events to
the events stream; the launcher hands each to `Verdicts.on_confirm`, which writes one line
to RUN_DIR/evals.jsonl and decides when the run is solved: the first confirmed mean at or
above `run.stop_at_return`.

Env steps "to solve" are those the actors had taken when the confirmed version was
published, not when the verdict came in: actors keep stepping while the evaluator judges,
and those steps did not make the model. Each actor's stats hash carries its step count and
the wall-clock time it was written (`updated_at`); `StepClock` interpolates every actor's
count at the version's publish time (from the ledger) and sums them.
"""

from __future__ import annotations

import bisect
import json
from pathlib import Path
from typing import Any, TextIO


class StepClock:
    """Env steps of every actor as a function of wall-clock time.

    Example:
        clock = StepClock()
        clock.observe(0, 100.0, 5_000); clock.observe(0, 102.0, 9_000)
        clock.steps_at(101.0)  # 7000.0
    """

    def __init__(self) -> None:
        self.samples: dict[int, tuple[list[float], list[int]]] = {}

    def observe(self, actor: int, updated_at: float, steps: int, started_at: float | None = None) -> None:
        """One refresh of an actor's stats hash. `started_at`, the process's start, anchors
        its count at 0 then: a version published before the first refresh (the first
        heartbeat comes thousands of CartPole steps in) is otherwise counted at 0 steps."""
        times, counts = self.samples.setdefault(actor, ([], []))
        if not times and started_at is not None and started_at < updated_at:
            times.append(started_at)
            counts.append(0)
        if times and updated_at <= times[-1]:
            return  # the same refresh read twice, or a restarted actor's stale hash
        times.append(updated_at)
        counts.append(steps)

    def covers(self, t: float) -> bool:
        """Whether every actor seen has been refreshed at or after `t` (so `steps_at(t)`
        interpolates for each, instead of extrapolating a rate from before `t`)."""
        return bool(self.samples) and all(times[-1] >= t for times, _ in self.samples.values())

    def steps_at(self, t: float) -> float:
        """Sum over actors of each one's steps at `t`, linear between refreshes.

        Before an actor's first point it counts 0; past its last refresh (a hash is
        rewritten only every heartbeat) its count goes on at its last rate.
        """
        total = 0.0
        for times, counts in self.samples.values():
            i = bisect.bisect_right(times, t)
            if i == 0:
                continue
            j = min(i, len(times) - 1)  # the segment that holds t, or the last one
            if j == 0:
                total += counts[0]
                continue
            t0, t1, c0, c1 = times[j - 1], times[j], counts[j - 1], counts[j]
            total += c0 + (c1 - c0) * (t - t0) / (t1 - t0)
        return total


class Verdicts:
    """The confirmed verdicts of one run: evals.jsonl lines and the first solving one.

    Example:
        verdicts = Verdicts(run_dir / "evals.jsonl", threshold=475.0)
        verdicts.on_confirm(event, wall_s=12.3, env_steps=41_000)
        verdicts.solve  # {'time_to_solve_s': 12.3, ...} once a mean >= 475 is confirmed
    """

    def __init__(self, path: Path, threshold: float):
        self.threshold = threshold
        self.solve: dict[str, Any] | None = None
        self.out: TextIO = open(path, "a")  # noqa: SIM115 (closed by close())

    def on_confirm(self, event: dict[str, str], wall_s: float, env_steps: int) -> None:
        """One confirm event as an evals.jsonl line; the first mean at or above the threshold is `solve`."""
        mean = float(event["mean_return"])
        row = {
            "wall_s": round(wall_s, 3),
            "env_steps": env_steps,
            "version": event["version"],
            "model": int(event.get("model", 0)),
            "mean": mean,
            "std": float(event["std_return"]),
            "min": float(event["min_return"]),
            "episodes": int(event["episodes"]),
            "best": event.get("best") == "1",
        }
        self.out.write(json.dumps(row) + "\n")
        self.out.flush()
        if self.solve is None and mean >= self.threshold:
            self.solve = {
                "time_to_solve_s": row["wall_s"],
                "env_steps_to_solve": env_steps,
                "solve_version": row["version"],
                "solve_eval_return": mean,
                "solve_eval_std": row["std"],
                "solve_eval_episodes": row["episodes"],
            }

    def close(self) -> None:
        """Close evals.jsonl."""
        self.out.close()
