"""The role processes of `canopy up`: start each in order, restart the ones that die, stop them all.

Place in the data flow: the launcher (cluster/launcher.py) hands the supervisor a prepared
run directory; the supervisor starts the Redis shards, then every other role through the
same `canopy <role> --config --id` commands operators run, and waits until each says
`running` in its stats hash. While the run goes on, the monitor (cluster/monitor.py) calls
`heal` once a loop; at the end the launcher stops the producers, the report
(cluster/report.py) reads what they left, and `shutdown` stops the rest. Children die with
the launcher even if it crashes (canopy/lifecycle.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from canopy.cache.shm import SHM_DIR
from canopy.cluster.hostplan import role_command, role_processes
from canopy.config import Config
from canopy.errors import UserError
from canopy.keys import Keys
from canopy.lease import follower_rank
from canopy.redisconn import connect

START_TIMEOUT_S = 90.0
REDIS_START_TIMEOUT_S = 60.0  # a shard loads its append-only file before it answers
STOP_TIMEOUT_S = 10.0
# A role that dies within this long of its restart is crash-looping: it waits a doubling
# backoff (a start-up that fails fast would otherwise spin); one that ran longer died on its
# own and is restarted at once, as a user waits for it (a cold restart of every learner).
STABLE_S = 10.0
# Stop order: producers first, so nobody waits on a role that is already gone.
STOP_ORDER = ("actor", "learner", "evaluator", "cache", "replay", "redis")


@dataclass
class Child:
    """One role process the supervisor started, and what a restart needs."""

    role: str
    ident: int
    proc: subprocess.Popen
    log: Path
    endpoints: dict[str, str] = field(default_factory=dict)
    args: tuple[str, ...] = ()  # extra command-line flags, kept for a restart
    standby: bool = False  # the standby learner: started last, stopped first
    died_at: float | None = None  # when the supervisor found it dead
    backoff: float = 0.0  # then: how long it waits before starting it again

    def describe(self) -> dict[str, Any]:
        """Its entry in cluster.json."""
        return {
            "id": self.ident,
            "pid": self.proc.pid,
            "endpoints": self.endpoints,
            "log": str(self.log),
            **({"standby": True} if self.standby else {}),
        }

    def log_tail(self, lines: int = 5) -> str:
        """The last `lines` lines of its log, joined by " | " (empty without a log)."""
        try:
            text = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])


class Supervisor:
    """Every process of one local run, the Redis shards included.

    Example:
        supervisor = Supervisor(cfg, run_dir, run_dir / "config.toml", Keys(cfg.run.name))
        supervisor.start_redis(); supervisor.start_roles(resume=False)
        supervisor.heal()  # once a loop while the run goes on
        supervisor.shutdown()
    """

    def __init__(self, cfg: Config, run_dir: Path, config_path: Path, keys: Keys) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.config_path = config_path
        self.keys = keys
        self.children: list[Child] = []
        # (role, id) -> (last restart time, backoff should it die again soon): crash loops.
        self.restarts: dict[tuple[str, int], tuple[float, float]] = {}
        # One client per shard, so that start-up waits for each; shard 0, the root, holds the
        # stats hashes and the events stream. Clients connect on first use.
        self.shards = [connect(cfg.cluster, "launcher", 0, shard=i) for i in range(len(cfg.cluster.redis))]
        self.r = self.shards[0]

    def spawn(
        self, role: str, ident: int, endpoints: dict[str, str] | None = None, args: tuple[str, ...] = ()
    ) -> Child:
        """Start one role process through `canopy <role>`, appending to logs/<role>-<id>.log."""
        log = self.run_dir / "logs" / f"{role}-{ident}.log"
        cmd = role_command(
            role, ident, str(self.config_path), args, (sys.executable, "-m", "canopy.cluster.cli")
        )
        env = {**os.environ, "CANOPY_PARENT_PID": str(os.getpid()), "PYTHONUNBUFFERED": "1"}
        with open(log, "ab") as out:  # append: a restarted role keeps its predecessor's log
            # Own session: a terminal's Ctrl-C reaches only the launcher, which stops
            # children in order instead of all of them dying at once.
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        child = Child(role, ident, proc, log, endpoints or {}, args, "--standby" in args)
        self.children.append(child)
        return child

    def role(self, role: str) -> list[Child]:
        """The children of `role`, in start order."""
        return [ch for ch in self.children if ch.role == role]

    # ---- start --------------------------------------------------------------------
    def start_redis(self) -> None:
        """Start every Redis shard and wait until each answers."""
        for i, addr in enumerate(self.cfg.cluster.redis):
            self.spawn("redis", i, {"redis": addr})
        deadline = time.monotonic() + REDIS_START_TIMEOUT_S
        for child, client in zip(self.children, self.shards, strict=True):
            while True:
                self._check_alive()
                try:
                    client.ping()
                    break
                except redis.ConnectionError:  # BusyLoadingError too: still reading its AOF
                    if time.monotonic() > deadline:
                        raise UserError(
                            f"redis shard {child.ident} did not answer within "
                            f"{REDIS_START_TIMEOUT_S:.0f}s: {child.log_tail()}"
                        ) from None
                    time.sleep(0.02)

    def start_roles(self, resume: bool) -> None:
        """Start every role but Redis, in the order the others need them; wait until all run."""
        cfg, c = self.cfg, self.cfg.cluster
        if resume:
            # Stats hashes of roles killed with the stopped run outlive it by a TTL, still
            # saying `running`: gone, so `_wait_running` waits for this run's roles.
            learners = cfg.learner.learners + 1  # the group's ranks and the standby
            counts = {"replay": cfg.replay.shards, "cache": cfg.cache.nodes, "learner": learners}
            counts |= {"evaluator": 1, "actor": cfg.actors.count}
            self.r.delete(*(self.keys.proc(role, i) for role, n in counts.items() for i in range(n)))
        for i, e in enumerate(c.replay):
            self.spawn("replay", i, {"replay": e})
        for i in range(cfg.cache.nodes):
            self.spawn("cache", i, {"fetch": c.cache_fetch[i], "notify": c.cache_notify[i]})
        learners = [(ident, args) for role, ident, args in role_processes(cfg) if role == "learner"]
        # Ids 1..N-1: followers of the learner group; id N (`--standby`): the standby, cold
        # until the first checkpoint (learner/standby.py), then warm, waiting on the lease.
        for ident, args in learners:
            if "--standby" not in args:
                self.spawn("learner", ident, args=args)
        self.spawn("evaluator", 0)
        for i in range(cfg.actors.count):
            self.spawn("actor", i)
        self._wait_running()
        # The standby last: its torch import would otherwise compete for the CPU with the
        # roles every run waits on, and it has nothing to do before a failover.
        for ident, args in learners:
            if "--standby" in args:
                self.spawn("learner", ident, args=args)
        self._wait_running(standby=True)  # announced (cold): cluster.json names a live process

    def _wait_running(self, standby: bool = False) -> None:
        """Until every role (or, with `standby`, the standby: any state) reports it runs."""
        pending = [ch for ch in self.children if ch.role != "redis" and ch.standby == standby]
        deadline = time.monotonic() + START_TIMEOUT_S
        while pending:
            self._check_alive()
            pipe = self.r.pipeline(transaction=False)
            for ch in pending:
                pipe.hget(self.keys.proc(ch.role, ch.ident), "state")
            states = pipe.execute()
            pending = [
                ch
                for ch, s in zip(pending, states, strict=True)
                if not (s is not None if standby else _started(ch.role, s))
            ]
            if pending and time.monotonic() > deadline:
                names = ", ".join(f"{ch.role} {ch.ident}" for ch in pending)
                raise UserError(
                    f"{names} did not start within {START_TIMEOUT_S:.0f}s; see {self.run_dir}/logs"
                )
            time.sleep(0.05)

    def _check_alive(self) -> None:
        for ch in self.children:
            code = ch.proc.poll()
            if code is not None:
                raise UserError(f"{ch.role} {ch.ident} exited with code {code}: {ch.log_tail(3)}")

    def describe(self) -> dict[str, Any]:
        """cluster.json: where every process of the run listens, its pid and its log."""
        roles: dict[str, list] = {}
        for ch in self.children:
            if ch.role != "redis":
                roles.setdefault(ch.role, []).append(ch.describe())
        return {
            "run": self.cfg.run.name,
            "run_dir": str(self.run_dir),
            "config": str(self.config_path),
            "redis": [
                {
                    "host": a.rpartition(":")[0],
                    "port": int(a.rpartition(":")[2]),
                    "pid": ch.proc.pid,
                }
                for a, ch in zip(self.cfg.cluster.redis, self.role("redis"), strict=True)
            ],
            "redis_user": self.cfg.cluster.redis_user,
            "password_file": self.cfg.cluster.password_file,
            "key_prefix": self.keys.prefix,
            "roles": roles,
        }

    # ---- run ----------------------------------------------------------------------
    def heal(self) -> None:
        """Restart any role that died: at once after a stable run, after a backoff that doubles
        per role (from `checkpoint.restart_backoff_s`, capped at 30 s) when it keeps dying
        within STABLE_S of its restart.

        A restarted learner comes back as a standby (the lease decides who trains), except a
        learner group's follower, which comes back as the same rank.
        """
        now = time.monotonic()
        for ch in list(self.children):
            code = ch.proc.poll()
            if code is None:
                continue
            key = (ch.role, ch.ident)
            if ch.died_at is None:
                last = self.restarts.get(key)
                ch.died_at, ch.backoff = now, last[1] if last and now - last[0] < STABLE_S else 0.0
                self._event("role_died", role=ch.role, ident=ch.ident, code=code, restart_in_s=ch.backoff)
            if now < ch.died_at + ch.backoff:
                continue
            self.children.remove(ch)
            # A learner group's followers rejoin the next group as themselves (learner/group.py).
            follower = follower_rank(self.cfg.learner.learners, ch.ident) is not None
            args = ("--standby",) if ch.role == "learner" and not follower else ch.args
            self.spawn(ch.role, ch.ident, ch.endpoints, args)
            backoff = min(30.0, 2 * ch.backoff) if ch.backoff else self.cfg.checkpoint.restart_backoff_s
            self.restarts[key] = (now, backoff)
            self._event("restart", role=ch.role, ident=ch.ident, next_backoff_s=backoff)

    def _event(self, kind: str, **fields: Any) -> None:
        """A launcher line on stderr and, while the root shard answers, in the events stream."""
        entry = {"kind": kind, "role": "launcher", "id": 0, **fields}
        print(f"canopy: {kind} " + " ".join(f"{k}={v}" for k, v in fields.items()), file=sys.stderr)
        with contextlib.suppress(redis.RedisError):  # the root shard itself may be the role that died
            self.r.xadd(
                self.keys.events, {k: str(v) for k, v in entry.items()}, maxlen=10_000, approximate=True
            )

    # ---- stop ---------------------------------------------------------------------
    def stop_roles(self, roles: tuple[str, ...]) -> None:
        """Stop `roles` one role at a time, standbys first: SIGTERM, then SIGKILL after STOP_TIMEOUT_S."""
        for role in roles:
            # Standbys first, so none takes over from an active learner being stopped.
            group = sorted(
                (ch for ch in self.role(role) if ch.proc.poll() is None), key=lambda ch: not ch.standby
            )
            for ch in group:
                ch.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT_S
            for ch in group:
                try:
                    ch.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    ch.proc.kill()
                    ch.proc.wait()
                    self._event("killed", role=role, ident=ch.ident, after_s=STOP_TIMEOUT_S)

    def shutdown(self) -> None:
        """Stop every process in STOP_ORDER and unlink the run's shared-memory rings."""
        self.stop_roles(STOP_ORDER)
        # A cache node killed by a signal cannot unlink its shared-memory ring: do it for it.
        for path in SHM_DIR.glob(f"canopy-{self.cfg.run.name}-*"):
            path.unlink(missing_ok=True)


def _started(role: str, state: bytes | None) -> bool:
    # A learner waiting as a standby is up too: on --resume the stopped run's lease may not
    # have expired yet, and learner 0 waits for it in state `standby`.
    return state == b"running" or (role == "learner" and state == b"standby")
