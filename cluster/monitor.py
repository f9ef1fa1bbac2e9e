"""What `canopy up` watches while it runs: role stats, the events stream, metrics.jsonl, progress.

Place in the data flow: every role writes its counters to its stats hash in the root Redis
shard and its events to the run's events stream. Once the supervisor (cluster/supervisor.py)
has every role up, `Monitor.run` loops until the run is solved, out of time or signalled:
it has the supervisor restart dead roles, hands each confirmed verdict to
cluster/verdicts.py (evals.jsonl, the solve), and once a second sums the stats hashes into
one row of RUN_DIR/metrics.jsonl, the TensorBoard scalars and the progress line. The report
(cluster/report.py) takes the last row, the solve and the stop reason from here.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections import deque
from typing import Any

import redis

from canopy.cache import ledger
from canopy.cluster import tboard
from canopy.cluster.progress import RunProgress
from canopy.cluster.supervisor import Supervisor
from canopy.cluster.verdicts import StepClock, Verdicts
from canopy.keys import Keys
from canopy.lease import parse_token
from canopy.version import Version


class Monitor:
    """The running cluster seen through Redis, and why it stopped.

    Example:
        monitor = Monitor(supervisor, t0=time.monotonic(), started_at=time.time())
        monitor.skip_earlier_events()  # once Redis is up, before the other roles start
        monitor.run(stop_flag)  # until solved, out of time or stop_flag[0]
        monitor.stop_reason  # "solved", "time_limit" or "signal"
    """

    def __init__(self, supervisor: Supervisor, t0: float, started_at: float) -> None:
        self.supervisor = supervisor
        self.cfg = supervisor.cfg
        self.r = supervisor.r
        self.keys = supervisor.keys
        self.t0 = t0
        self.started_at = started_at
        self.clock = StepClock()
        self.verdicts: Verdicts | None = None
        self.last_event: bytes | str = "0-0"  # the id of the last event read
        self.stop_reason = ""
        # Confirm events waiting for the actors' counts: (event, wall_s, publish time, deadline).
        self.pending: deque[tuple[dict[str, str], float, float, float]] = deque()

    def skip_earlier_events(self) -> None:
        """Read events from here on: a resumed run's stream holds the earlier runs' events."""
        newest = self.r.xrevrange(self.keys.events, count=1)
        self.last_event = newest[0][0] if newest else "0-0"

    def run(self, stop_flag: list[bool]) -> None:
        """Loop until solved, out of time or `stop_flag[0]`, then set `stop_reason`.

        Each turn heals dead roles and records verdicts; once a second, one metrics row.
        """
        cfg = self.cfg
        self.verdicts = Verdicts(self.supervisor.run_dir / "evals.jsonl", cfg.run.stop_at_return)
        metrics = open(self.supervisor.run_dir / "metrics.jsonl", "a")  # noqa: SIM115 (closed below)
        scalars = tboard.open_log(self.supervisor.run_dir, self.started_at)  # None without tensorboard
        progress = RunProgress(cfg.run.time_limit_s)
        last_row = 0.0
        try:
            while not stop_flag[0]:
                self.supervisor.heal()
                try:
                    self._read_events(block_ms=1000)
                except redis.ConnectionError:
                    time.sleep(0.5)  # the root shard died; heal restarts it
                    continue
                if self.verdicts.solve is None and time.monotonic() - last_row < 1.0:
                    continue  # events can arrive many times a second; one metrics row per second
                last_row = time.monotonic()
                try:
                    snap = self.snapshot()
                except redis.ConnectionError:
                    continue  # the root shard died between two reads; heal restarts it
                self._record_ready()  # verdicts the snapshot's fresh counts now cover
                metrics.write(json.dumps(snap) + "\n")
                metrics.flush()
                if scalars is not None:
                    scalars.write(snap)
                progress.update(snap["wall_s"], _progress_line(snap))
                if self.verdicts.solve is not None:
                    self.stop_reason = "solved"
                    break
                if cfg.run.time_limit_s and snap["wall_s"] >= cfg.run.time_limit_s:
                    self.stop_reason = "time_limit"
                    break
            else:
                self.stop_reason = "signal"
        finally:
            metrics.close()
            if scalars is not None:
                scalars.close()
            progress.close()

    def drain_verdicts(self) -> None:
        """Record the verdicts that came in after the monitor stopped (the evaluator finishes
        the one in hand when it is stopped), so evals.jsonl ends with the pinned best's."""
        assert self.verdicts is not None
        with contextlib.suppress(redis.RedisError):
            while self._read_events(block_ms=None):
                pass
            self.snapshot()  # the stopped actors' final counts
        self._record_ready(force=True)
        self.verdicts.close()

    def _read_events(self, block_ms: int | None) -> int:
        """Hand each event after the last one read to `_on_event`; how many there were."""
        entries = self.r.xread({self.keys.events: self.last_event}, count=1000, block=block_ms) or []
        for _, items in entries:
            for entry_id, fields in items:
                self.last_event = entry_id
                self._on_event({k.decode(): v.decode() for k, v in fields.items()})
        return sum(len(items) for _, items in entries)

    def _on_event(self, event: dict[str, str]) -> None:
        """A confirmed verdict: held until its step count is known (`_record_ready`)."""
        if event.get("kind") != "confirm" or self.verdicts is None:
            return
        snap = self.snapshot()  # fresh actor counts for the step clock
        key = self.keys.ledger_version(Version.parse(event["version"]))
        at = ledger.published_at(self.r.hget(key, ledger.PUBLISHED_AT))
        if at is None:
            at = time.time()
        deadline = time.monotonic() + 3 * self.cfg.run.heartbeat_s
        self.pending.append((event, snap["wall_s"], at, deadline))
        self._record_ready()

    def _record_ready(self, force: bool = False) -> None:
        """Hand the held verdicts, oldest first, to evals.jsonl and the solve once every actor's
        count was refreshed after the version's publish time (or three heartbeats passed, or
        `force`). A version is often confirmed before the actors' next refresh (the first
        comes seconds in): its steps then come from counts on both sides of its publish time,
        not from an extrapolation of none."""
        assert self.verdicts is not None
        while self.pending:
            event, wall_s, at, deadline = self.pending[0]
            if not (force or self.clock.covers(at) or time.monotonic() > deadline):
                return
            self.pending.popleft()
            self.verdicts.on_confirm(event, wall_s, round(self.clock.steps_at(at)))

    def snapshot(self) -> dict[str, Any]:
        """One row of metrics.jsonl: the run's counters summed from the stats hashes."""
        pipe = self.r.pipeline(transaction=False)
        actors = self.supervisor.role("actor")
        for ch in actors:
            pipe.hgetall(self.keys.proc("actor", ch.ident))
        pipe.hgetall(self.keys.proc("learner", active_learner(self.r, self.keys)))
        pipe.hgetall(self.keys.proc("evaluator", 0))
        *actor_stats, learner, evaluator = [_decode(h) for h in pipe.execute()]
        for ch, s in zip(actors, actor_stats, strict=True):
            if "updated_at" in s:
                started = float(s["started_at"]) if "started_at" in s else None
                self.clock.observe(
                    ch.ident, float(s["updated_at"]), int(s.get("env_steps_total", 0)), started
                )
        returns = [
            float(s["episode_return_mean"]) for s in actor_stats if s.get("episodes_total", "0") != "0"
        ]
        learner_version = learner.get("policy_version", "0.0")
        lags = [_step_lag(learner_version, s.get("policy_version", "0.0")) for s in actor_stats]
        return {
            "wall_s": round(time.monotonic() - self.t0, 3),
            "env_steps": sum(int(s.get("env_steps_total", 0)) for s in actor_stats),
            "episodes": sum(int(s.get("episodes_total", 0)) for s in actor_stats),
            "train_return": round(sum(returns) / len(returns), 2) if returns else None,
            "updates": int(learner.get("updates_total", 0)),
            "loss": float(learner.get("loss", 0.0)),
            "version": learner_version,
            "policy_lag_versions": max(lags) if lags else 0,
            "eval_return": float(evaluator["eval_return"]) if "eval_return" in evaluator else None,
            "eval_version": evaluator.get("eval_version"),
        }

    def stats(self, role: str, ident: int) -> dict[str, str]:
        """One process's stats hash, decoded."""
        return _decode(self.r.hgetall(self.keys.proc(role, ident)))


def active_learner(r: redis.Redis, keys: Keys) -> int:
    """The id of the learner holding the lease (0 when none does)."""
    try:
        value = r.get(keys.lease)
    except redis.RedisError:
        return 0
    held = parse_token(value)
    return held[1] if held is not None else 0


def _progress_line(s: dict[str, Any]) -> str:
    rate = s["env_steps"] / s["wall_s"] if s["wall_s"] else 0.0
    upd = s["updates"] / s["wall_s"] if s["wall_s"] else 0.0
    ret = "-" if s["train_return"] is None else f"{s['train_return']:.1f}"
    ev = "-" if s["eval_return"] is None else f"{s['eval_return']:.1f}@{s['eval_version']}"
    return (
        f"{s['wall_s']:6.1f}s  steps {s['env_steps']:>8} ({rate:,.0f}/s)  episodes {s['episodes']:>6}  "
        f"return {ret:>6}  eval {ev}  updates {s['updates']:>6} ({upd:,.0f}/s)  "
        f"version {s['version']}  lag {s['policy_lag_versions']}"
    )


def _step_lag(learner_version: str, actor_version: str) -> int:
    """Versions between learner and actor, in learner steps (0 across epochs we cannot compare)."""
    le, _, ls = learner_version.partition(".")
    ae, _, as_ = actor_version.partition(".")
    if le != ae or not (ls.isdigit() and as_.isdigit()):
        return 0
    return max(0, int(ls) - int(as_))  # the two hashes refresh at different moments


def _decode(h: dict) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in h.items()}
