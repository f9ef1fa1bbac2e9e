"""`canopy bench faults [--faults a,b] --json FILE`: the fault matrix on one live `canopy up`.

One CartPole run (two Redis shards, two replay shards, a cache node, a learner and its
warm standby, the evaluator, two actors) takes every fault in turn, each after the cluster
has settled again (every role running, a standby warm, a checkpoint committed since):

- `actor`, `replay`, `cache` (killed right after a publish, while it fetches that version),
  `redis` (a non-root shard): kill -9; recovered when the role is back (and, for the cache
  node, when every actor acts with a version published after the kill);
- `learner`, then `standby` (the one that took over): kill -9; recovered at the first
  version of a newer epoch;
- `zombie`: SIGSTOP of the active learner until its standby took over and published, then
  SIGCONT: it must stop (fenced) without publishing or committing anything after it woke;
- `root`: kill -9 of Redis shard 0 (lease, epoch, model:latest, events); recovered at the
  first newer version once the launcher brought it back.

Detection is the first sign of the fault in the run's own records: the launcher's
`role_died` (read from its stderr, which carries it even while the root shard is down) or
a standby's `failover` event. Every fault also checks that versions keep increasing, that
the evaluator's return does not collapse, and that every checkpoint committed before the
fault still loads (`checkpoint.keep` is raised so retention deletes none of them). At the
end, every process the run ever started (children of `canopy up`, tracked from /proc) must
be gone. The baseline beside each recovery time is the run's normal gap between versions.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import redis
from rich.console import Console

from canopy.cache import ledger
from canopy.cluster.bench import cutoff, harness, report
from canopy.cluster.bench.liverun import LiveRun
from canopy.cluster.bench.outcome import ACTOR_STEPS, RECOVER_TIMEOUT_S, Outcome, table
from canopy.errors import DeadlineExceeded, UserError
from canopy.learner.checkpoint.store import Incomplete
from canopy.lifecycle import wait_until
from canopy.version import Version

FAULTS = ("actor", "replay", "cache", "redis", "learner", "standby", "zombie", "root")
# Recovery goals (s) on a small shared machine; a warm standby must take over within 5 s.
GOALS_S = {
    "actor": 15.0,
    "replay": 15.0,
    "cache": 20.0,
    "redis": 15.0,
    "learner": 5.0,
    "standby": 5.0,
    "zombie": 5.0,
    "root": 20.0,
}
UP_SETTINGS = (
    "checkpoint.every_s=1.0",
    "checkpoint.keep=200",  # no retention during the run: every pre-fault checkpoint must load
    "checkpoint.restart_backoff_s=0.2",
    "replay.shards=2",
    "replay.min_size=300",
    "actors.count=2",
    "learner.publish_every=20",
)
EVAL_WAIT_S = 30.0


class Cluster(LiveRun):
    """A `canopy up` run that takes the faults of FAULTS one at a time (liverun.py watches it).

    Example:
        with Cluster(Path("/tmp/run")) as c:
            outcome = c.inject("actor")
        c.leftover  # processes of the run still alive after it stopped (must be empty)
    """

    def __init__(self, run_dir: Path, time_limit_s: float = 900.0, settings: tuple[str, ...] = UP_SETTINGS):
        self._last_recovery = 0.0  # the next fault waits for a checkpoint committed after this
        super().__init__(run_dir, time_limit_s, settings)

    # ---- faults ---------------------------------------------------------------------
    def inject(self, fault: str) -> Outcome:
        """Settle, apply `fault`, measure detection, recovery and the aftermath."""
        if fault not in FAULTS:
            raise UserError(f"unknown fault {fault!r}: choose from {', '.join(FAULTS)}")
        self.settle(self._last_recovery)
        t_settled = time.time()
        before = self.latest()
        assert before is not None
        out = Outcome(fault, "", GOALS_S[fault], version_before=str(before))
        out.eval_before = self._last_eval(t_settled - 600)
        committed = [c for c in self.store.committed()]
        try:
            recovered_version = getattr(self, f"_fault_{fault}")(out, before)
            self._aftermath(out, recovered_version, committed)
        except (DeadlineExceeded, UserError) as exc:
            out.error = str(exc)
        self._last_recovery = time.time()
        return out

    def _kill_role(self, role: str, ident: int, out: Outcome, sig: int = signal.SIGKILL) -> tuple[int, float]:
        pid = self.redis_pid(ident) if role == "redis" else int(self.proc(role, ident)["pid"])
        out.target = f"{role} {ident} (pid {pid})"
        t = time.time()
        os.kill(pid, sig)
        return pid, t

    def redis_pid(self, ident: int) -> int:
        """The pid of the redis-server behind shard `ident` (restarted shards have new ones)."""
        conf = f"/redis-{ident}/redis.conf"
        for pid in harness.descendants(self.up.pid):
            cmd = harness.cmdline(pid)
            if "redis-server" in cmd and conf in cmd:
                return pid
        return self.redis_pids[ident]

    def _detect(self, out: Outcome, t: float, role: str, ident: int, failover: bool = False) -> None:
        def seen() -> tuple[float, str] | None:
            hits = []
            died = self.launcher_line("role_died", role, ident, t)
            if died is not None:
                hits.append((died, "role_died"))
            if failover:
                hits += [(te, "failover") for te, _ in self.events_since(t, "failover")[:1]]
            return min(hits) if hits else None

        when, by = wait_until(seen, RECOVER_TIMEOUT_S, f"detection of the {out.fault} fault", 0.05)
        out.detect_s, out.detected_by = round(max(0.0, when - t), 3), by

    def _role_back(self, out: Outcome, t: float, role: str, ident: int, old_pid: int) -> Version:
        def back() -> bool:
            h = self.proc(role, ident)
            return h.get("state") == "running" and int(h.get("pid", 0)) not in (0, old_pid)

        wait_until(back, RECOVER_TIMEOUT_S, f"{role} {ident} running again", 0.05)
        out.recover_s, out.recovered_by = round(time.time() - t, 3), f"{role} {ident} running again"
        return self.latest() or Version(0, 0)

    def _new_epoch(self, out: Outcome, t: float, before: Version) -> Version:
        def newer() -> Version | None:
            v = self.latest()
            return v if v is not None and v.epoch > before.epoch else None

        v = wait_until(newer, RECOVER_TIMEOUT_S, "a version of a newer epoch", 0.05)
        first = min((ts for ts, _ in self._ledger_since(t, v.epoch)), default=None)
        out.recover_s = round((first or time.time()) - t, 3)
        out.recovered_by = f"first version of epoch {v.epoch}"
        return v

    def _fault_actor(self, out: Outcome, before: Version) -> Version:
        pid, t = self._kill_role("actor", 0, out)
        self._detect(out, t, "actor", 0)
        return self._role_back(out, t, "actor", 0, pid)

    def _fault_replay(self, out: Outcome, before: Version) -> Version:
        pid, t = self._kill_role("replay", 0, out)
        self._detect(out, t, "replay", 0)
        return self._role_back(out, t, "replay", 0, pid)

    def _fault_cache(self, out: Outcome, before: Version) -> Version:
        # Killed on a publish notification: the node is fetching that version right now.
        sub = self.r.pubsub(ignore_subscribe_messages=True)
        sub.subscribe(self.keys.model_notify)
        try:
            wait_until(lambda: sub.get_message(timeout=0.2), RECOVER_TIMEOUT_S, "a publish notification", 0)
        finally:
            sub.close()
        pid, t = self._kill_role("cache", 0, out)
        at_kill = self.latest() or before
        out.target += f", on the publish of {at_kill}"
        self._detect(out, t, "cache", 0)
        self._role_back(out, t, "cache", 0, pid)

        def actors_fed() -> bool:
            acting = self._get(lambda: ledger.acting(self.r, self.keys), {})
            versions = [Version.parse(v) for v in acting.values()]
            return len(versions) >= self.cfg.actors.count and all(v > at_kill for v in versions)

        wait_until(
            actors_fed, RECOVER_TIMEOUT_S, "every actor acting with a version newer than the kill", 0.05
        )
        out.recover_s, out.recovered_by = round(time.time() - t, 3), "every actor on a newer version"
        return self.latest() or before

    def _fault_redis(self, out: Outcome, before: Version) -> Version:
        ident = len(self.shards) - 1
        _pid, t = self._kill_role("redis", ident, out)
        self._detect(out, t, "redis", ident)
        wait_until(
            lambda: self.launcher_line("restart", "redis", ident, t) and self._get(self.shards[ident].ping),
            RECOVER_TIMEOUT_S,
            f"redis shard {ident} answering again",
            0.05,
        )
        out.recover_s, out.recovered_by = round(time.time() - t, 3), f"redis shard {ident} answering"
        return self.latest() or before

    def _fault_learner(self, out: Outcome, before: Version) -> Version:
        active = self.active_learner()
        assert active is not None
        _, t = self._kill_role("learner", active, out)
        self._detect(out, t, "learner", active, failover=True)
        return self._new_epoch(out, t, before)

    def _fault_standby(self, out: Outcome, before: Version) -> Version:
        """Kill the learner, let its standby take over, then kill that one (the one measured)."""
        self._fault_learner(Outcome("learner", "", 0.0), before)
        self.settle(time.time())
        return self._fault_learner(out, self.latest() or before)

    def _fault_zombie(self, out: Outcome, before: Version) -> Version:
        active = self.active_learner()
        assert active is not None
        pid, t = self._kill_role("learner", active, out, signal.SIGSTOP)
        zombie_epoch = before.epoch
        out.target = f"learner {active} (pid {pid}, epoch {zombie_epoch}) SIGSTOP"
        try:
            self._detect(out, t, "learner", active, failover=True)
            v = self._new_epoch(out, t, before)
        finally:
            t_cont = time.time()
            os.kill(pid, signal.SIGCONT)
        out.target += f" for {t_cont - t:.1f}s"

        def stopped() -> bool:
            fenced = any(e.get("id") == str(active) for _, e in self.events_since(t_cont, "fence"))
            return fenced or not harness.alive(pid)

        try:
            out.fenced = wait_until(stopped, RECOVER_TIMEOUT_S, "the zombie to stop", 0.1)
        except DeadlineExceeded:
            out.fenced = False
        wait_until(lambda: not harness.alive(pid), RECOVER_TIMEOUT_S, "the zombie process to exit", 0.1)
        out.zombie_writes = [v for _, v in self._ledger_since(t_cont, zombie_epoch)]
        out.zombie_writes += [
            f"checkpoint {e['ckpt']}"
            for _, e in self.events_since(t_cont, "checkpoint_commit")
            if Version.parse(e["ckpt"]).epoch == zombie_epoch
        ]
        return v

    def _fault_root(self, out: Outcome, before: Version) -> Version:
        _, t = self._kill_role("redis", 0, out)
        self._detect(out, t, "redis", 0)

        def newer() -> Version | None:
            v = self.latest()
            return v if v is not None and v > before else None

        v = wait_until(newer, RECOVER_TIMEOUT_S, "a newer version after the root came back", 0.05)
        out.recover_s = round((self.published_at(v) or time.time()) - t, 3)
        out.recovered_by = f"version {v} published"
        return v

    # ---- aftermath ------------------------------------------------------------------
    def _aftermath(self, out: Outcome, recovered: Version, committed: list[str]) -> None:
        """Versions go on past `recovered`, the evaluator's return holds, no checkpoint is lost."""
        later = wait_until(
            lambda: (v := self.latest()) is not None and v > recovered and v,
            RECOVER_TIMEOUT_S,
            f"a version newer than {recovered}",
            0.1,
        )
        out.version_after = str(later)
        out.versions_increasing = later > recovered and later > Version.parse(out.version_before)
        self._actors_flow(out)
        t_wait = time.time()

        def best_fresh() -> float | None:
            evals = [e for _, e in self.events_since(t_wait - 60, "eval")]
            fresh = [float(e["mean_return"]) for e in evals if Version.parse(e["version"]) >= recovered]
            return max(fresh) if fresh else None

        # The best screen since recovery, not the first: one 10-episode screen of a version
        # still in training swings by half either way with no fault at all, so the first
        # alone would blame the fault for that noise. Returns as soon as it holds.
        target = 0.5 * out.eval_before if out.eval_before is not None else -math.inf

        def holding() -> float | None:
            best = best_fresh()
            return best if best is not None and best >= target else None

        try:
            out.eval_after = wait_until(holding, EVAL_WAIT_S, "an evaluation after recovery", 0.2)
        except DeadlineExceeded:
            out.eval_after = best_fresh()
        out.checkpoints_checked = len(committed)
        present = set(self.store.committed())
        out.checkpoints_lost = [c for c in committed if c not in present]
        for ckpt in committed[:1]:  # the newest: what a restore after this fault would load
            try:
                self.store.load(ckpt)
            except (Incomplete, redis.RedisError) as exc:
                out.checkpoints_lost.append(f"{ckpt}: {exc}")

    def _actors_flow(self, out: Outcome) -> None:
        """Every actor steps on, without dying again (an actor blocked on a lost shard would not)."""
        n = self.cfg.actors.count
        # A root shard that just came back may not hold every actor's stats hash yet.
        base = wait_until(
            lambda: (
                (hs := {i: self.proc("actor", i) for i in range(n)})
                and all("pid" in h for h in hs.values())
                and hs
            ),
            RECOVER_TIMEOUT_S,
            "every actor's stats hash",
            0.2,
        )

        def flowing() -> bool:
            for i, h0 in base.items():
                h = self.proc("actor", i)
                if h.get("pid") != h0.get("pid"):
                    raise UserError(f"actor {i} died after the {out.fault} fault: see its log")
                if int(h.get("env_steps_total", 0)) < int(h0.get("env_steps_total", 0)) + ACTOR_STEPS:
                    return False
            return True

        wait_until(flowing, RECOVER_TIMEOUT_S, f"every actor to step {ACTOR_STEPS} more env steps", 0.2)


def parse_faults(text: str) -> list[str]:
    """`a,b,c` -> the faults in the order given; one line naming the known ones otherwise."""
    known = (*FAULTS, *cutoff.CUT_FAULTS)
    names = [f.strip() for f in text.split(",") if f.strip()]
    unknown = [f for f in names if f not in known]
    if unknown or not names:
        raise UserError(f"unknown fault(s) {', '.join(unknown) or text!r}: choose from {','.join(known)}")
    return names


def main(args: argparse.Namespace) -> int:
    """The kills on one live `canopy up`, then the cut-offs; report to `--json`, 1 if a check is missed."""
    faults = parse_faults(args.faults)
    run_dir = Path(tempfile.mkdtemp(prefix="canopy-faults-"))
    console = Console(stderr=True, width=200)
    outcomes: list[Outcome] = []
    t0 = time.time()
    baseline, leftover, tracked = None, [], 0
    if kills := [f for f in faults if f in FAULTS]:
        with Cluster(run_dir / "up") as cluster:
            for fault in kills:
                console.print(f"fault: {fault}")
                outcomes.append(cluster.inject(fault))
            baseline = cluster.publish_gap_s(t0)
        leftover, tracked = [str(p) for p in cluster.leftover], len(cluster.pids)
    if cuts := [f for f in faults if f in cutoff.CUT_FAULTS]:
        console.print(f"faults: {', '.join(cuts)} (network namespaces)")
        cut_outcomes, cut_leftover = cutoff.run(cuts, run_dir / "netns")
        outcomes += cut_outcomes
        leftover += cut_leftover
    console.print(table(outcomes, baseline))
    checks = [
        report.check(
            f"{o.fault}: recovered within {o.goal_s:.0f}s, training continues, nothing lost",
            o.recover_s,
            "s",
            f"<= {o.goal_s:.0f}",
            baseline,
            o.ok,
        )
        for o in outcomes
    ]
    checks.append(report.check("no process left behind", len(leftover), "processes", "0", None, not leftover))
    figures = {
        "faults": [asdict(o) | {"ok": o.ok} for o in outcomes],
        "publish_gap_s": baseline,
        "processes_tracked": tracked,
        "leftover_pids": leftover,
        "run_dir": str(run_dir),
        "wall_s": round(time.time() - t0, 1),
    }
    report.write(args.json, "faults", figures, checks)
    return 0 if all(c["met"] for c in checks) else 1
