"""`canopy plot RUN_DIR [RUN_DIR ...]`: learning curves and throughput from metrics.jsonl.

One PNG with three panels: return (training mean and greedy evaluation) against env steps,
the same against wall time (a star where summary.json says the run was solved), and env
steps/s and learner updates/s over time. Several run directories are drawn on the same
axes, labelled by run directory name.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed

import matplotlib.pyplot as plt

from canopy.errors import UserError

# Stats hashes refresh every heartbeat (2 s) while metrics rows come every second, so rates
# are taken over several rows; row-to-row differences would alternate between 0 and spikes.
RATE_WINDOW = 5


def load_metrics(run_dir: Path) -> list[dict]:
    """The rows of RUN_DIR/metrics.jsonl, skipping a line a crash cut short."""
    path = run_dir / "metrics.jsonl"
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise UserError(f"{path} not found: pass a run directory written by canopy up") from None
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
    return rows


def load_solve(run_dir: Path) -> dict[str, float] | None:
    """Where summary.json says the run was solved (the evaluation that met the threshold), if it was.

    The solving evaluation arrives as an event, so the last metrics row can miss it.
    """
    keys = ("env_steps_to_solve", "time_to_solve_s", "solve_eval_return")
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or summary.get("solved") is not True:
        return None
    values = {k: summary.get(k) for k in keys}
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values.values()):
        return None
    return values


def plot(run_dirs: list[str], out: str) -> Path:
    """Draw the runs of `run_dirs` into one PNG at `out`; its path."""
    fig, (by_steps, by_time, rates) = plt.subplots(1, 3, figsize=(16, 4.5))
    for run_dir in map(Path, run_dirs):
        rows = load_metrics(run_dir)
        if not rows:
            continue
        name = run_dir.name
        steps = [r["env_steps"] for r in rows]
        wall = [r["wall_s"] for r in rows]
        train = [r["train_return"] for r in rows]
        evals = [r["eval_return"] for r in rows]
        solve = load_solve(run_dir)
        for ax, x, key in ((by_steps, steps, "env_steps_to_solve"), (by_time, wall, "time_to_solve_s")):
            line = ax.plot(x, train, label=f"{name} training", alpha=0.6)[0]
            ax.plot(x, evals, label=f"{name} greedy eval", color=line.get_color(), linestyle="--")
            if solve is not None:
                ax.plot(solve[key], solve["solve_eval_return"], "*", markersize=12, color=line.get_color())
                ax.annotate("solved", (solve[key], solve["solve_eval_return"]), fontsize=7)
        updates = [r["updates"] for r in rows]
        rates.plot(wall[RATE_WINDOW:], _rate(steps, wall), label=f"{name} env steps/s")
        rates.plot(wall[RATE_WINDOW:], _rate(updates, wall), label=f"{name} updates/s", linestyle=":")
    by_steps.set(xlabel="env steps", ylabel="return", title="return vs env steps")
    by_time.set(xlabel="wall time (s)", ylabel="return", title="return vs wall time")
    rates.set(xlabel="wall time (s)", ylabel="per second", title="throughput", yscale="log")
    for ax in (by_steps, by_time, rates):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)


def _rate(counts: list[float], wall: list[float]) -> list[float]:
    k = RATE_WINDOW
    return [(counts[i] - counts[i - k]) / max(wall[i] - wall[i - k], 1e-9) for i in range(k, len(counts))]
