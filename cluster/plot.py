"""`canopy plot [RUN_DIR ...] [CONNECTION]`: learning curves and throughput of runs.

A `canopy up` run directory is read from its metrics.jsonl (written by cluster/monitor.py);
a run of any launcher, named by a connection (cluster/connection.py), from its `metrics`
stream in Redis (written by the lease-holding learner, learner/metrics.py). One PNG with
three panels: return (training mean and greedy evaluation) against env steps, the same
against wall time (a star where summary.json says the run was solved), and env steps/s and
learner updates/s over time. Several runs are drawn on the same axes, labelled by run
directory or run name.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed

import matplotlib.pyplot as plt
import redis

from canopy.cluster.connection import Target
from canopy.errors import UserError
from canopy.keys import METRICS_MAXLEN, Keys

# Stats hashes refresh every heartbeat (2 s) while metrics rows come every second, so rates
# are taken over several rows; row-to-row differences would alternate between 0 and spikes.
RATE_WINDOW = 5
STREAM_PAGE = 1000  # entries per XRANGE call
# Fields of a metrics stream entry that become a row's numbers; anything else is not read.
STREAM_FIELDS = ("env_steps", "episodes", "updates", "train_return", "eval_return")


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


def load_stream(r: redis.Redis, keys: Keys) -> list[dict]:
    """The rows of the run's `metrics` stream, as metrics.jsonl holds them: `wall_s` counts
    from the first entry kept. Entries with a missing or non-finite time are skipped, other
    fields that are not numbers become None (anyone with write access can XADD anything)."""
    rows: list[dict] = []
    start = "-"
    try:
        while len(rows) <= 2 * METRICS_MAXLEN:  # MAXLEN ~ keeps a little more than the bound
            page = r.xrange(keys.metrics, min=start, count=STREAM_PAGE)
            for _, fields in page:
                row = _stream_row({k.decode(errors="replace"): v for k, v in fields.items()})
                if row is not None:
                    rows.append(row)
            if len(page) < STREAM_PAGE:
                break
            start = "(" + page[-1][0].decode()
    except redis.RedisError as exc:
        raise UserError(f"cannot read {keys.metrics} ({exc})") from None
    if rows:
        t0 = rows[0]["wall_s"]
        for row in rows:
            row["wall_s"] -= t0
    return rows


def _stream_row(fields: dict[str, bytes]) -> dict | None:
    t = _finite(fields.get("t"))
    if t is None:
        return None
    row: dict = {"wall_s": t}
    for name in STREAM_FIELDS:
        row[name] = _finite(fields.get(name))
    row["env_steps"] = row["env_steps"] or 0.0
    row["updates"] = row["updates"] or 0.0
    return row


def _finite(raw: bytes | None) -> float | None:
    try:
        value = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


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


def plot(run_dirs: list[str], out: str, live: Target | None = None) -> Path:
    """Draw the runs of `run_dirs` and the run `live` names (from its metrics stream) into
    one PNG at `out`; its path."""
    runs = [(Path(d).name, load_metrics(Path(d)), load_solve(Path(d))) for d in run_dirs]
    if live is not None:
        client = live.client("plot")
        try:
            rows = load_stream(client, live.keys)
        finally:
            client.close()
        if not rows:
            raise UserError(f"{live.keys.metrics} at {live.where()} is empty: has the run's learner started?")
        runs.append((live.keys.run, rows, None))
    fig, (by_steps, by_time, rates) = plt.subplots(1, 3, figsize=(16, 4.5))
    for name, rows, solve in runs:
        if not rows:
            continue
        steps = [r["env_steps"] for r in rows]
        wall = [r["wall_s"] for r in rows]
        train = [r["train_return"] for r in rows]
        evals = [r["eval_return"] for r in rows]
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
