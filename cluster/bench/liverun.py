"""A live `canopy up` under test: started, watched, waited on until steady, and stopped.

Place: the run the fault matrix (faults.py) injects its kills into. This part only looks:
the launcher's `role_died` and `restart` lines (from its stderr, which carries them even
while the root Redis shard is down), the run's Redis view, and every process the run ever
started (children of `canopy up`, tracked from /proc, so `close` can tell which outlived it).
faults.py's `Cluster` adds the faults on top.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

import redis

from canopy import config as config_mod
from canopy.cache import ledger
from canopy.cluster.bench import harness
from canopy.errors import DeadlineExceeded, UserError
from canopy.keys import Keys
from canopy.learner.checkpoint.placement import make_plan, shard_hosts_of
from canopy.learner.checkpoint.store import CheckpointStore
from canopy.lease import parse_token
from canopy.lifecycle import wait_until
from canopy.redisconn import connect
from canopy.version import Version

START_TIMEOUT_S = 180.0
SETTLE_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 60.0
LAUNCHER_LINE = re.compile(r"^canopy: (role_died|restart) (.*)$")


class LiveRun:
    """A `canopy up` run under test: its Redis view, launcher lines and every pid it started.

    Example:
        with LiveRun(Path("/tmp/run"), 600.0, ("actors.count=2",)) as run:
            run.settle(0.0)
        run.leftover  # processes of the run still alive after it stopped (must be empty)
    """

    def __init__(self, run_dir: Path, time_limit_s: float, settings: tuple[str, ...]):
        self.run_dir = run_dir
        env = {**os.environ}
        env.pop("CANOPY_PARENT_PID", None)  # this run is not a child of any other canopy up
        cmd = harness.up_command(
            "CartPole-v1", run_dir, stop_at_return="1e9", time_limit=time_limit_s, sets=settings
        )
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

    def __enter__(self) -> Self:
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
            self.pids.update(harness.descendants(self.up.pid))

    def _connect(self) -> None:
        described = harness.wait_started(self.up, self.run_dir, START_TIMEOUT_S, self.tail)
        self.cfg = config_mod.load(self.run_dir / "config.toml")
        self.keys = Keys(self.cfg.run.name)
        n = len(self.cfg.cluster.redis)
        self.shards = [connect(self.cfg.cluster, "bench", 0, shard=i) for i in range(n)]
        for r in self.shards:
            r.connection_pool.connection_kwargs.update(socket_timeout=2.0, socket_connect_timeout=1.0)
        self.r = self.shards[0]

        plan = make_plan(shard_hosts_of(self.cfg.checkpoint.shard_hosts, self.cfg.cluster.redis), 1)
        self.store = CheckpointStore(self.shards, self.keys, plan)
        self.redis_pids = {i: e["pid"] for i, e in enumerate(described["redis"])}
        self.pids.update(harness.descendants(self.up.pid))

    def tail(self) -> str:
        """The last lines `canopy up` wrote to stderr, for error messages."""
        return " | ".join(self.stderr_tail[-5:])

    def _get(self, fn: Callable[[], Any], default: Any = None) -> Any:
        """A read from Redis that answers `default` while a shard is down."""
        try:
            return fn()
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
            return default

    def latest(self) -> Version | None:
        """`model:latest`; None before the first publish or while the root shard is down."""
        return harness.latest_version(self.r, self.keys)

    def proc(self, role: str, ident: int) -> dict[str, str]:
        """A role process's stats hash, decoded ({} while the root shard is down)."""
        h = self._get(lambda: self.r.hgetall(self.keys.proc(role, ident)), {})
        return {k.decode(): v.decode() for k, v in h.items()}

    def active_learner(self) -> int | None:
        """The id of the learner holding the lease; None when none does or the root shard is down."""
        held = parse_token(self._get(lambda: self.r.get(self.keys.lease)))
        return held[1] if held is not None else None

    def events_since(self, t: float, kind: str | None = None) -> list[tuple[float, dict[str, str]]]:
        """Events of the stream at or after wall time `t`, with their times (from the entry ids)."""
        return harness.read_events(self.r, self.keys, kind, since=t)

    def launcher_line(self, kind: str, role: str, ident: int, after: float) -> float | None:
        """Wall time of the launcher's first `kind` line for one role since `after`."""
        for t, k, f in list(self.lines):
            if t >= after and k == kind and f.get("role") == role and f.get("ident") == str(ident):
                return t
        return None

    def published_at(self, v: Version) -> float | None:
        """When the ledger says `v` was published; None when it cannot tell."""
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

    def _last_eval(self, since: float) -> float | None:
        evals = self.events_since(since, "eval")
        return float(evals[-1][1]["mean_return"]) if evals else None

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
                    if h.get("state") != "running" or not harness.alive(int(h.get("pid", 0))):
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

    # ---- end ------------------------------------------------------------------------
    def close(self) -> None:
        """Stop `canopy up`; `leftover` lists every process of the run still alive after it."""
        if self.closed:
            return
        self.closed = True
        self.pids.update(harness.descendants(self.up.pid))
        self._stop.set()
        harness.stop([self.up], STOP_TIMEOUT_S)  # SIGTERM: the launcher stops its roles itself
        for r in getattr(self, "shards", []):
            r.close()
        try:
            wait_until(
                lambda: not any(harness.same_process(p, s) for p, s in self.pids.items()),
                10.0,
                "the run's processes",
            )
        except DeadlineExceeded:
            self.leftover = [p for p, s in self.pids.items() if harness.same_process(p, s)]
            for pid in self.leftover:  # report them, but leave none behind on this machine
                os.kill(pid, signal.SIGKILL)
