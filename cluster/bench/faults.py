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
import itertools
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis
from rich.console import Console
from rich.table import Table

from cache import ledger
from cluster import config as config_mod
from cluster.bench import report
from cluster.errors import DeadlineExceeded, UserError
from cluster.keys import Keys
from cluster.lifecycle import wait_until
from cluster.redisconn import connect
from cluster.version import Version
from learner.checkpoint.lease import parse_token
from learner.checkpoint.placement import make_plan, shard_hosts_of
from learner.checkpoint.store import CheckpointStore, Incomplete

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
START_TIMEOUT_S = 180.0
SETTLE_TIMEOUT_S = 120.0
RECOVER_TIMEOUT_S = 60.0
EVAL_WAIT_S = 30.0
ACTOR_STEPS = 500  # env steps every actor must take after recovery
STOP_TIMEOUT_S = 60.0
LAUNCHER_LINE = re.compile(r"^canopy: (role_died|restart) (.*)$")


@dataclass
class Outcome:
    """What one fault did to the run; `ok` is the check the JSON reports."""

    fault: str
    target: str
    goal_s: float
    detect_s: float | None = None
    detected_by: str = ""
    recover_s: float | None = None
    recovered_by: str = ""
    version_before: str = ""
    version_after: str = ""
    versions_increasing: bool = False
    eval_before: float | None = None
    eval_after: float | None = None
    checkpoints_checked: int = 0
    checkpoints_lost: list[str] = field(default_factory=list)
    fenced: bool | None = None  # zombie only: it stopped after waking
    zombie_writes: list[str] = field(default_factory=list)  # zombie only: versions/ckpts after SIGCONT
    error: str = ""

    @property
    def eval_collapsed(self) -> bool:
        """A policy that was worth keeping (return >= 100) lost more than half of its return."""
        if self.eval_before is None or self.eval_before < 100:
            return False
        return self.eval_after is None or self.eval_after < 0.5 * self.eval_before

    @property
    def ok(self) -> bool:
        return (
            not self.error
            and self.detect_s is not None
            and self.recover_s is not None
            and self.recover_s <= self.goal_s
            and self.versions_increasing
            and not self.checkpoints_lost
            and not self.eval_collapsed
            and self.fenced is not False
            and not self.zombie_writes
        )


class Cluster:
    """A `canopy up` run under test: its Redis view, launcher lines and every pid it started.

    Example:
        with Cluster(Path("/tmp/run")) as c:
            outcome = c.inject("actor")
        c.leftover  # processes of the run still alive after it stopped (must be empty)
    """

    def __init__(self, run_dir: Path, time_limit_s: float = 900.0, settings: tuple[str, ...] = UP_SETTINGS):
        self.run_dir = run_dir
        env = {**os.environ}
        env.pop("CANOPY_PARENT_PID", None)  # this run is not a child of any other canopy up
        cmd = [sys.executable, "-m", "cluster.cli", "up", "--env", "CartPole-v1", "--run-dir", str(run_dir)]
        cmd += ["--stop-at-return", "1e9", "--time-limit", str(time_limit_s)]
        for item in settings:
            cmd += ["--set", item]
        self.up = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True
        )
        self.lines: list[tuple[float, str, dict[str, str]]] = []  # (wall time, kind, fields)
        self.stderr_tail: list[str] = []
        self.pids: dict[int, str] = {}  # pid -> its start time in /proc, for pid reuse
        self.leftover: list[int] = []
        self.closed = False
        self._stop = threading.Event()
        threading.Thread(target=self._read_stderr, daemon=True).start()
        threading.Thread(target=self._track_pids, daemon=True).start()
        try:
            self._connect()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- watching -------------------------------------------------------------------
    def _read_stderr(self) -> None:
        assert self.up.stderr is not None
        for raw in self.up.stderr:
            line = raw.decode(errors="replace").rstrip()
            self.stderr_tail = ([*self.stderr_tail, line])[-20:]
            m = LAUNCHER_LINE.match(line)
            if m:
                fields = dict(kv.split("=", 1) for kv in m.group(2).split() if "=" in kv)
                self.lines.append((time.time(), m.group(1), fields))

    def _track_pids(self) -> None:
        while not self._stop.wait(0.5):
            self.pids.update(_descendants(self.up.pid))

    def _connect(self) -> None:
        cluster_json = self.run_dir / "cluster.json"
        try:
            wait_until(
                lambda: cluster_json.exists() or self.up.poll() is not None, START_TIMEOUT_S, "cluster.json"
            )
        except DeadlineExceeded:
            raise UserError(f"canopy up did not start in {START_TIMEOUT_S:.0f}s: {self.tail()}") from None
        if self.up.poll() is not None:
            raise UserError(f"canopy up exited with code {self.up.returncode}: {self.tail()}")
        self.cfg = config_mod.load(self.run_dir / "config.toml")
        self.keys = Keys(self.cfg.run.name)
        n = len(self.cfg.cluster.redis)
        self.shards = [connect(self.cfg.cluster, "bench", 0, shard=i) for i in range(n)]
        for r in self.shards:
            r.connection_pool.connection_kwargs.update(socket_timeout=2.0, socket_connect_timeout=1.0)
        self.r = self.shards[0]

        plan = make_plan(shard_hosts_of(self.cfg.checkpoint.shard_hosts, self.cfg.cluster.redis), 1)
        self.store = CheckpointStore(self.shards, self.keys, plan)
        self.redis_pids = {i: e["pid"] for i, e in enumerate(_read_json(cluster_json)["redis"])}
        self.pids.update(_descendants(self.up.pid))

    def tail(self) -> str:
        return " | ".join(self.stderr_tail[-5:])

    def _get(self, fn: Callable[[], Any], default: Any = None) -> Any:
        """A read from Redis that answers `default` while a shard is down."""
        try:
            return fn()
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
            return default

    def latest(self) -> Version | None:
        value = self._get(lambda: self.r.get(self.keys.model_latest))
        return Version.parse(value) if value else None

    def proc(self, role: str, ident: int) -> dict[str, str]:
        h = self._get(lambda: self.r.hgetall(self.keys.proc(role, ident)), {})
        return {k.decode(): v.decode() for k, v in h.items()}

    def active_learner(self) -> int | None:
        held = parse_token(self._get(lambda: self.r.get(self.keys.lease)))
        return held[1] if held is not None else None

    def events_since(self, t: float, kind: str | None = None) -> list[tuple[float, dict[str, str]]]:
        """Events of the stream at or after wall time `t`, with their times (from the entry ids)."""
        entries = self._get(lambda: self.r.xrange(self.keys.events, min=f"{int(t * 1000)}-0"), [])
        out = []
        for entry_id, fields in entries:
            event = {k.decode(): v.decode() for k, v in fields.items()}
            if kind is None or event.get("kind") == kind:
                out.append((int(entry_id.decode().partition("-")[0]) / 1000, event))
        return out

    def launcher_line(self, kind: str, role: str, ident: int, after: float) -> float | None:
        """Wall time of the launcher's first `kind` line for one role since `after`."""
        for t, k, f in list(self.lines):
            if t >= after and k == kind and f.get("role") == role and f.get("ident") == str(ident):
                return t
        return None

    def published_at(self, v: Version) -> float | None:
        return ledger.published_at(
            self._get(lambda: self.r.hget(self.keys.ledger_version(str(v)), ledger.PUBLISHED_AT))
        )

    def publish_gap_s(self, since: float) -> float | None:
        """Median time between the versions published since `since`: the run's normal cadence."""
        times = sorted(t for t, _ in self._ledger_since(since))
        gaps = [b - a for a, b in itertools.pairwise(times)]
        return round(statistics.median(gaps), 3) if gaps else None

    def _ledger_since(self, since: float, epoch: int | None = None) -> list[tuple[float, str]]:
        pattern = self.keys.ledger_version(f"{epoch}.*" if epoch is not None else "*")
        out = []
        for key in self._get(lambda: list(self.r.scan_iter(match=pattern, count=1000)), []):
            t = ledger.published_at(self._get(lambda k=key: self.r.hget(k, ledger.PUBLISHED_AT)))
            if t is not None and t >= since:
                out.append((t, key.decode().rpartition(":")[2]))
        return out

    # ---- steady state ---------------------------------------------------------------
    def settle(self, since: float) -> None:
        """Wait until every role runs, a standby is warm, and a checkpoint was committed since `since`."""
        counts = {"replay": self.cfg.replay.shards, "cache": self.cfg.cache.nodes}
        counts |= {"evaluator": 1, "actor": self.cfg.actors.count}

        def steady() -> bool:
            if not all(self._get(r.ping, False) for r in self.shards):
                return False
            active = self.active_learner()
            if active is None or self.proc("learner", active).get("state") != "running":
                return False
            if self.cfg.checkpoint.standby and self.proc("learner", 1 - active).get("state") != "standby":
                return False
            for role, n in counts.items():
                for i in range(n):
                    h = self.proc(role, i)
                    if h.get("state") != "running" or not _alive(int(h.get("pid", 0))):
                        return False
            commits = self.events_since(since, "checkpoint_commit")
            return any(Version.parse(e["ckpt"]).epoch == self._epoch() for _, e in commits)

        try:
            wait_until(
                lambda: self.up.poll() is not None or steady(), SETTLE_TIMEOUT_S, "a steady cluster", 0.2
            )
        except DeadlineExceeded:
            raise UserError(f"the run did not settle in {SETTLE_TIMEOUT_S:.0f}s: {self.tail()}") from None
        if self.up.poll() is not None:
            raise UserError(f"canopy up exited with code {self.up.returncode}: {self.tail()}")

    def _epoch(self) -> int:
        v = self.latest()
        return v.epoch if v else 0

    # ---- faults ---------------------------------------------------------------------
    def inject(self, fault: str) -> Outcome:
        """Settle, apply `fault`, measure detection, recovery and the aftermath."""
        if fault not in FAULTS:
            raise UserError(f"unknown fault {fault!r}: choose from {', '.join(FAULTS)}")
        self.settle(getattr(self, "_last_recovery", 0.0))
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
        for pid in _descendants(self.up.pid):
            cmd = _cmdline(pid)
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
            acting = self._get(lambda: self.r.hgetall(self.keys.ledger_actors), {})
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
            return fenced or not _alive(pid)

        try:
            out.fenced = wait_until(stopped, RECOVER_TIMEOUT_S, "the zombie to stop", 0.1)
        except DeadlineExceeded:
            out.fenced = False
        wait_until(lambda: not _alive(pid), RECOVER_TIMEOUT_S, "the zombie process to exit", 0.1)
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

        def evaluated() -> float | None:
            evals = [e for _, e in self.events_since(t_wait - 60, "eval")]
            fresh = [e for e in evals if Version.parse(e["version"]) >= recovered]
            return float(fresh[-1]["mean_return"]) if fresh else None

        try:
            out.eval_after = wait_until(evaluated, EVAL_WAIT_S, "an evaluation after recovery", 0.2)
        except DeadlineExceeded:
            out.eval_after = None
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

    def _last_eval(self, since: float) -> float | None:
        evals = self.events_since(since, "eval")
        return float(evals[-1][1]["mean_return"]) if evals else None

    # ---- end ------------------------------------------------------------------------
    def close(self) -> None:
        """Stop `canopy up`; `leftover` lists every process of the run still alive after it."""
        if self.closed:
            return
        self.closed = True
        self.pids.update(_descendants(self.up.pid))
        self._stop.set()
        if self.up.poll() is None:
            self.up.send_signal(signal.SIGTERM)
            try:
                self.up.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.up.kill()
                self.up.wait()
        for r in getattr(self, "shards", []):
            r.close()
        try:
            wait_until(
                lambda: not any(_same(p, s) for p, s in self.pids.items()), 10.0, "the run's processes"
            )
        except DeadlineExceeded:
            self.leftover = [p for p, s in self.pids.items() if _same(p, s)]
            for pid in self.leftover:  # report them, but leave none behind on this machine
                os.kill(pid, signal.SIGKILL)


def _descendants(root: int) -> dict[int, str]:
    """Every live descendant of `root` with its start time (field 22 of /proc/<pid>/stat)."""
    parent: dict[int, int] = {}
    start: dict[int, str] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        parent[int(entry.name)], start[int(entry.name)] = int(fields[1]), fields[19]
    found: dict[int, str] = {}
    frontier = [root]
    while frontier:
        p = frontier.pop()
        for child, ppid in parent.items():
            if ppid == p and child not in found:
                found[child] = start[child]
                frontier.append(child)
    return found


def _same(pid: int, start: str) -> bool:
    """`pid` is still the process first seen with start time `start`, and not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return False
    return fields[0] != "Z" and fields[19] == start


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def parse_faults(text: str) -> list[str]:
    """`a,b,c` -> the faults in the order given; one line naming the known ones otherwise."""
    from cluster.bench.cutoff import CUT_FAULTS

    known = (*FAULTS, *CUT_FAULTS)
    names = [f.strip() for f in text.split(",") if f.strip()]
    unknown = [f for f in names if f not in known]
    if unknown or not names:
        raise UserError(f"unknown fault(s) {', '.join(unknown) or text!r}: choose from {','.join(known)}")
    return names


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def table(outcomes: list[Outcome], baseline_s: float | None) -> Table:
    t = Table(title=f"fault matrix (normal gap between versions: {_fmt(baseline_s)} s)")
    for col in (
        "fault",
        "target",
        "detect s",
        "by",
        "recover s",
        "goal s",
        "versions",
        "eval",
        "ckpts",
        "ok",
    ):
        t.add_column(col)
    for o in outcomes:
        extra = "" if o.fenced is None else (" fenced" if o.fenced else " NOT fenced")
        t.add_row(
            o.fault,
            o.target + extra,
            _fmt(o.detect_s),
            o.detected_by,
            _fmt(o.recover_s),
            f"{o.goal_s:.0f}",
            f"{o.version_before} -> {o.version_after or '?'}",
            f"{_fmt(o.eval_before)} -> {_fmt(o.eval_after)}",
            f"{o.checkpoints_checked - len(o.checkpoints_lost)}/{o.checkpoints_checked}",
            "yes" if o.ok else f"NO {o.error[:60]}",
        )
    return t


def main(args: argparse.Namespace) -> int:
    from cluster.bench import cutoff

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
