"""`canopy up`: the embedded local cluster, every role in its own OS process.

build (ports, password, resolved config) -> init (Redis shards, then every role through
the same `canopy <role> --config --id` commands operators run; cluster.json once all are
up) -> run (progress line, metrics.jsonl, watch for a solving evaluation, a time limit,
a dead child or a signal; restart any role that dies, Redis shards included) -> report
(the newest and the best confirmed version scored on fresh episodes, the best saved as
RUN_DIR/best.safetensors, a final snapshot of every replay shard, summary.json).
Children die with the launcher even if it crashes (cluster/lifecycle.py).

Resume (`canopy up --resume RUN_DIR`): the run's resolved config is loaded back, the Redis
shards start on their append-only files in RUN_DIR/redis-<i> (cluster/redis_server.py) and
the replay shards on their snapshots in RUN_DIR/replay (`replay.snapshot_dir`), so the
learner restores its newest checkpoint under a new, larger epoch and trains on the replay
contents it left. Only the addresses are new: ports are picked again.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import zmq

from actors.envs import check_env_id
from cache import ledger, topology
from cache.shm import SHM_DIR
from cluster import acl, curve, redis_server, tboard, wire
from cluster import config as config_mod
from cluster.config import Config
from cluster.errors import DeadlineExceeded, ProtocolError, UserError
from cluster.hostplan import follower_rank, role_command, role_processes
from cluster.keys import Keys
from cluster.ports import free_ports
from cluster.progress import RunProgress, waiting
from cluster.redisconn import connect, role_password_file
from cluster.verdicts import StepClock, Verdicts
from cluster.version import Version
from learner.checkpoint.lease import parse_token

START_TIMEOUT_S = 90.0
REDIS_START_TIMEOUT_S = 60.0  # a shard loads its append-only file before it answers
SNAPSHOT_TIMEOUT_S = 60.0  # the final replay snapshot of a clean stop
STOP_TIMEOUT_S = 10.0
FINAL_EVAL_SEED = 2 * 10**9  # the hand-over's scoring seeds: none of the evaluator's or actors'
# Stop order: producers first, so nobody waits on a role that is already gone.
STOP_ORDER = ("actor", "learner", "evaluator", "cache", "replay", "redis")


@dataclass
class Child:
    role: str
    ident: int
    proc: subprocess.Popen
    log: Path
    endpoints: dict[str, str] = field(default_factory=dict)
    args: tuple[str, ...] = ()  # extra command-line flags, kept for a restart
    standby: bool = False  # a warm standby learner: not waited for, stopped first

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.ident,
            "pid": self.proc.pid,
            "endpoints": self.endpoints,
            "log": str(self.log),
            **({"standby": True} if self.standby else {}),
        }

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])


class Launcher:
    def __init__(self, cfg: Config, resume: bool = False):
        self.cfg = cfg
        self.resume = resume
        self.children: list[Child] = []
        self.t0 = time.monotonic()
        self.started_at = time.time()
        self.stop_reason = ""
        # (role, id) -> (restart time, next backoff): roles that died and come back.
        self.restarts: dict[tuple[str, int], tuple[float, float]] = {}
        self.restarts_total = 0
        self.clock = StepClock()
        self.verdicts: Verdicts | None = None

    # ---- build --------------------------------------------------------------------
    def prepare(self) -> None:
        cfg = self.cfg
        redis_server.binary()
        check_env_id(cfg.env.id)
        if not cfg.run.name:
            cfg.run.name = time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)
        run_dir = Path(cfg.run.dir or Path("runs") / cfg.run.name).resolve()
        if self.resume:
            check_resumable(cfg, run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "logs").mkdir(exist_ok=True)
        cfg.run.dir = str(run_dir)
        host = cfg.cluster.host
        group = cfg.learner.learners > 1  # the learner group's rendezvous (learner/group.py)
        n_ports = cfg.redis.shards + cfg.replay.shards + 2 * cfg.cache.nodes + int(group)
        ports = iter(free_ports(n_ports, host))
        c = cfg.cluster
        c.redis = [f"{host}:{next(ports)}" for _ in range(cfg.redis.shards)]
        c.replay = [f"tcp://{host}:{next(ports)}" for _ in range(cfg.replay.shards)]
        c.cache_fetch = [f"tcp://{host}:{next(ports)}" for _ in range(cfg.cache.nodes)]
        c.cache_notify = [f"tcp://{host}:{next(ports)}" for _ in range(cfg.cache.nodes)]
        c.learner_store = f"{host}:{next(ports)}" if group else ""
        # The planner's fan-out, written into config.toml so every node builds the same tree.
        cfg.cache.fanout = cfg.cache.fanout or topology.for_config(cfg).fanout
        if not cfg.replay.snapshot_dir:
            cfg.replay.snapshot_dir = str(run_dir / "replay")
        c.password_file = str(run_dir / "redis.password")
        c.role_users = True  # every role its own least-privilege Redis user (cluster/acl.py)
        for path in [Path(c.password_file)] + [role_password_file(c, role) for role in acl.ROLES]:
            if not (self.resume and path.exists()):  # operators of a resumed run keep theirs
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(secrets.token_urlsafe(24))
        self.config_path = run_dir / "config.toml"
        config_mod.save(cfg, self.config_path)
        self.run_dir = run_dir
        self.keys = Keys(cfg.run.name)

    # ---- init ---------------------------------------------------------------------
    def spawn(
        self, role: str, ident: int, endpoints: dict[str, str] | None = None, args: tuple[str, ...] = ()
    ) -> Child:
        log = self.run_dir / "logs" / f"{role}-{ident}.log"
        cmd = role_command(role, ident, str(self.config_path), args, (sys.executable, "-m", "cluster.cli"))
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

    def start(self) -> None:
        cfg, c = self.cfg, self.cfg.cluster
        for i, addr in enumerate(c.redis):
            self.spawn("redis", i, {"redis": addr})
        self.r = self._wait_redis()
        # A resumed run's stream holds the earlier runs' events: read only this one's.
        newest = self.r.xrevrange(self.keys.events, count=1)
        self.events_from = newest[0][0] if newest else "0-0"
        if self.resume:
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
        for role, ident, args in role_processes(cfg):
            if role == "learner":
                # Ids 1..N-1: followers of the learner group; id N (`--standby`): a warm
                # standby, torch imported and model built, waiting on the learner lease.
                self.spawn("learner", ident, args=args)
        self.spawn("evaluator", 0)
        for i in range(cfg.actors.count):
            self.spawn("actor", i)
        self._wait_running()
        self._write_cluster_json()

    def _wait_redis(self) -> redis.Redis:
        clients = [
            connect(self.cfg.cluster, "launcher", 0, shard=i) for i in range(len(self.cfg.cluster.redis))
        ]
        deadline = time.monotonic() + REDIS_START_TIMEOUT_S
        for child, client in zip(self.children, clients, strict=True):
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
        return clients[0]

    def _wait_running(self) -> None:
        pending = [ch for ch in self.children if ch.role != "redis" and not ch.standby]
        deadline = time.monotonic() + START_TIMEOUT_S
        while pending:
            self._check_alive()
            pipe = self.r.pipeline(transaction=False)
            for ch in pending:
                pipe.hget(self.keys.proc(ch.role, ch.ident), "state")
            states = pipe.execute()
            pending = [ch for ch, s in zip(pending, states, strict=True) if not _started(ch.role, s)]
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

    def _heal(self) -> None:
        """Restart any role that died, after a backoff that doubles per role (capped at 30 s).

        A restarted learner comes back as a standby (the lease decides who trains), except a
        learner group's follower, which comes back as the same rank.
        """
        now = time.monotonic()
        for ch in list(self.children):
            code = ch.proc.poll()
            if code is None:
                continue
            key = (ch.role, ch.ident)
            if key not in self.restarts:
                backoff = self.cfg.checkpoint.restart_backoff_s
                self.restarts[key] = (now + backoff, min(30.0, max(2 * backoff, 0.5)))
                self._launcher_event(
                    "role_died", role=ch.role, ident=ch.ident, code=code, restart_in_s=backoff
                )
                continue
            due, backoff = self.restarts[key]
            if now < due:
                continue
            self.children.remove(ch)
            # A learner group's followers rejoin the next group as themselves (learner/group.py).
            follower = follower_rank(self.cfg.learner.learners, ch.ident) is not None
            args = ("--standby",) if ch.role == "learner" and not follower else ch.args
            self.spawn(ch.role, ch.ident, ch.endpoints, args)
            self.restarts_total += 1
            self._launcher_event("restart", role=ch.role, ident=ch.ident, next_backoff_s=backoff)
            # Keep the longer backoff for a while: a role that keeps dying restarts ever slower.
            self.restarts[key] = (now + backoff, min(30.0, 2 * backoff))
        for key, (due, _) in list(self.restarts.items()):
            alive = [ch for ch in self._role(key[0]) if ch.ident == key[1] and ch.proc.poll() is None]
            if alive and now > due + 60:
                del self.restarts[key]

    def _launcher_event(self, kind: str, **fields: Any) -> None:
        entry = {"kind": kind, "role": "launcher", "id": 0, **fields}
        print(f"canopy: {kind} " + " ".join(f"{k}={v}" for k, v in fields.items()), file=sys.stderr)
        with contextlib.suppress(redis.RedisError):  # the root shard itself may be the role that died
            self.r.xadd(
                self.keys.events, {k: str(v) for k, v in entry.items()}, maxlen=10_000, approximate=True
            )

    def active_learner(self) -> int:
        """The id of the learner holding the lease (0 when none does)."""
        try:
            value = self.r.get(self.keys.lease)
        except redis.RedisError:
            return 0
        held = parse_token(value)
        return held[1] if held is not None else 0

    def _write_cluster_json(self) -> None:
        roles: dict[str, list] = {}
        for ch in self.children:
            if ch.role != "redis":
                roles.setdefault(ch.role, []).append(ch.describe())
        doc = {
            "run": self.cfg.run.name,
            "run_dir": str(self.run_dir),
            "config": str(self.config_path),
            "redis": [
                {
                    "host": a.rpartition(":")[0],
                    "port": int(a.rpartition(":")[2]),
                    "pid": ch.proc.pid,
                }
                for a, ch in zip(self.cfg.cluster.redis, self._role("redis"), strict=True)
            ],
            "redis_user": self.cfg.cluster.redis_user,
            "password_file": self.cfg.cluster.password_file,
            "key_prefix": self.keys.prefix,
            "roles": roles,
        }
        _write_json(self.run_dir / "cluster.json", doc)

    def _role(self, role: str) -> list[Child]:
        return [ch for ch in self.children if ch.role == role]

    # ---- run ----------------------------------------------------------------------
    def monitor(self, stop_flag: list[bool]) -> None:
        cfg = self.cfg
        self.verdicts = Verdicts(self.run_dir / "evals.jsonl", cfg.run.stop_at_return)
        self.last_event = self.events_from
        metrics = open(self.run_dir / "metrics.jsonl", "a")  # noqa: SIM115 (closed below)
        scalars = tboard.open_log(self.run_dir, self.started_at)  # None without tensorboard
        progress = RunProgress(cfg.run.time_limit_s)
        last_row = 0.0
        try:
            while not stop_flag[0]:
                self._heal()
                try:
                    self._read_events(block_ms=1000)
                except redis.ConnectionError:
                    time.sleep(0.5)  # the root shard died; _heal restarts it
                    continue
                if self.verdicts.solve is None and time.monotonic() - last_row < 1.0:
                    continue  # events can arrive many times a second; one metrics row per second
                last_row = time.monotonic()
                try:
                    snap = self.snapshot()
                except redis.ConnectionError:
                    continue  # the root shard died between two reads; _heal restarts it
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
        """A confirmed verdict: evals.jsonl, and the solve once one reaches the threshold."""
        if event.get("kind") != "confirm" or self.verdicts is None:
            return
        snap = self.snapshot()  # fresh actor counts for the step clock
        key = self.keys.ledger_version(Version.parse(event["version"]))
        at = ledger.published_at(self.r.hget(key, ledger.PUBLISHED_AT))
        if at is None:
            at = time.time()
        self.verdicts.on_confirm(event, snap["wall_s"], round(self.clock.steps_at(at)))

    def snapshot(self) -> dict[str, Any]:
        """One row of metrics.jsonl: the run's counters summed from the stats hashes."""
        pipe = self.r.pipeline(transaction=False)
        actors = self._role("actor")
        for ch in actors:
            pipe.hgetall(self.keys.proc("actor", ch.ident))
        pipe.hgetall(self.keys.proc("learner", self.active_learner()))
        pipe.hgetall(self.keys.proc("evaluator", 0))
        *actor_stats, learner, evaluator = [_decode(h) for h in pipe.execute()]
        for ch, s in zip(actors, actor_stats, strict=True):
            if "updated_at" in s:
                self.clock.observe(ch.ident, float(s["updated_at"]), int(s.get("env_steps_total", 0)))
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

    # ---- report -------------------------------------------------------------------
    def stop_roles(self, roles: tuple[str, ...]) -> None:
        for role in roles:
            # Standbys first, so none takes over from an active learner being stopped.
            group = sorted(
                (ch for ch in self._role(role) if ch.proc.poll() is None), key=lambda ch: not ch.standby
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

    def snapshot_replay(self) -> list[dict[str, Any]]:
        """Ask every replay shard for a snapshot now (actors and learner stopped: nothing moves).

        Each entry is the shard's reply header (or `error`), kept in summary.json so a
        resumed run can be checked against what was saved.
        """
        out = []
        for ch in self._role("replay"):
            if ch.proc.poll() is not None:
                out.append({"id": ch.ident, "error": f"not running (exit code {ch.proc.returncode})"})
                continue
            try:
                reply = replay_request(ch.endpoints["replay"], {"op": "snapshot"}, SNAPSHOT_TIMEOUT_S)
            except (DeadlineExceeded, ProtocolError) as exc:
                reply = {"error": str(exc)}
            out.append({"id": ch.ident, **reply})
        return out

    def handover(self) -> dict[str, Any]:
        """Score the newest and the best confirmed version on fresh episodes; save the best.

        Both over `eval.confirm_episodes` episodes on seeds no evaluation used, so summary.json
        says what a user gets, not what the evaluator saw; the best goes to RUN_DIR/best.safetensors.
        """
        from actors.evaluator import judge
        from actors.policy import population_arrays
        from learner.export import handover, write_policy

        n, seed = self.cfg.eval.confirm_episodes, FINAL_EVAL_SEED + self.cfg.run.seed * 10_000
        figures = ("version", "model", "return_mean", "return_std", "return_min", "episodes")
        out: dict[str, Any] = {f"{which}_{k}": None for which in ("newest", "best") for k in figures}
        for which in ("newest", "best"):
            try:
                taken = handover(self.r, self.keys, which)
            except (UserError, ProtocolError) as exc:
                out[f"{which}_error"] = str(exc)
                continue
            models = population_arrays(taken.arrays)
            if which == "newest":  # a population's newest version is worth its best model
                scores = [judge(taken.manifest.arch, m, self.cfg.env, n, seed) for m in models]
                model = max(range(len(scores)), key=lambda i: scores[i]["mean"])
                score = scores[model]
            else:
                model = taken.model
                score = judge(taken.manifest.arch, models[model], self.cfg.env, n, seed)
                out["best_confirmed_return"] = float(taken.record.get("mean", "nan"))
                with contextlib.suppress(ProtocolError):  # a non-mlp policy: eval, not export
                    write_policy(taken, self.cfg.env, self.run_dir / "best.safetensors", model=model)
                    out["best_file"] = str(self.run_dir / "best.safetensors")
            out |= {
                f"{which}_version": str(taken.manifest.version),
                f"{which}_model": model,
                f"{which}_return_mean": score["mean"],
                f"{which}_return_std": score["std"],
                f"{which}_return_min": score["min"],
                f"{which}_episodes": score["episodes"],
            }
        return out

    def summary(
        self,
        final: dict[str, Any],
        learner: dict[str, str],
        last: dict[str, Any],
        replay_snapshots: list[dict[str, Any]],
    ) -> dict[str, Any]:
        import gymnasium
        import torch

        solve = (self.verdicts.solve if self.verdicts else None) or {}
        return {
            "run": self.cfg.run.name,
            "env_id": self.cfg.env.id,
            "seed": self.cfg.run.seed,
            "stop_at_return": self.cfg.run.stop_at_return,
            "solved": bool(solve),
            "stop_reason": self.stop_reason,
            "resumed": self.resume,
            "time_to_solve_s": solve.get("time_to_solve_s"),
            "env_steps_to_solve": solve.get("env_steps_to_solve"),
            "solve_version": solve.get("solve_version"),
            "solve_eval_return": solve.get("solve_eval_return"),
            "solve_eval_std": solve.get("solve_eval_std"),
            **final,
            # The newest version's score, under the name runs before best-version pinning used.
            "final_eval_return": final.get("newest_return_mean"),
            "versions_published": int(learner.get("versions_published_total", 0)),
            "updates": int(learner.get("updates_total", 0)),
            "env_steps": last.get("env_steps"),
            "epoch": int(learner.get("epoch", 0)),
            "replay_snapshots": replay_snapshots,
            "wall_s": round(time.monotonic() - self.t0, 3),
            "started_at": self.started_at,
            "versions": {
                "canopy": _canopy_version(),
                "python": platform.python_version(),
                "torch": torch.__version__,
                "gymnasium": gymnasium.__version__,
                "redis_server": redis_server.version(),
            },
            "machine": machine_facts(),
        }

    def shutdown(self) -> None:
        self.stop_roles(STOP_ORDER)
        # A cache node killed by a signal cannot unlink its shared-memory ring: do it for it.
        for path in SHM_DIR.glob(f"canopy-{self.cfg.run.name}-*"):
            path.unlink(missing_ok=True)


def up(cfg: Config, resume: bool = False) -> dict[str, Any]:
    """Run a local cluster until solved, out of time, or signalled; returns summary.json's content.

    `resume`: `cfg` is the config.toml of a stopped run (see the module docstring).
    """
    curve.use(curve.load(cfg.cluster))  # for its own requests to the replay shards
    launcher = Launcher(cfg, resume)
    launcher.prepare()
    stop_flag = [False]

    def on_signal(signum: int, frame: object) -> None:
        stop_flag[0] = True

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        verb = "resuming run" if resume else "run"
        print(f"canopy: {verb} {cfg.run.name} in {launcher.run_dir}", file=sys.stderr)
        with waiting("starting every role"):
            launcher.start()
        print(f"canopy: all roles up in {time.monotonic() - launcher.t0:.1f}s", file=sys.stderr)
        launcher.monitor(stop_flag)
        last = launcher.snapshot()
        active = launcher.active_learner()  # before the stop releases its lease
        # The evaluator too: it finishes the verdict in hand, so the pinned best is final.
        launcher.stop_roles(("actor", "learner", "evaluator"))
        launcher.drain_verdicts()
        # Read now: the stats hash expires three heartbeats after the learner stopped, and
        # the final evaluation may take longer than that.
        learner = _decode(launcher.r.hgetall(launcher.keys.proc("learner", active)))
        with waiting("scoring the newest and the best confirmed version"):
            final = launcher.handover()
        summary = launcher.summary(final, learner, last, launcher.snapshot_replay())
        _write_json(launcher.run_dir / "summary.json", summary)
        return summary
    finally:
        launcher.shutdown()
        for s, handler in old.items():
            signal.signal(s, handler)


def check_resumable(cfg: Config, run_dir: Path) -> None:
    """Refuse to resume a run that is still running, or one that left nothing to resume from."""
    cluster_json = run_dir / "cluster.json"
    if cluster_json.exists():
        doc = json.loads(cluster_json.read_text())
        pids = [e["pid"] for e in doc.get("redis", [])]
        pids += [e["pid"] for entries in doc.get("roles", {}).values() for e in entries]
        for pid in pids:
            if _is_canopy_process(pid):
                raise UserError(f"run {cfg.run.name} is still running (pid {pid}): stop it before --resume")
    if cfg.redis.persist and not any(run_dir.glob("redis-0/appendonlydir/*")):
        raise UserError(
            f"nothing to resume in {run_dir}: no Redis data in redis-0/ "
            "(was the run started with redis.persist = false?)"
        )


def _is_canopy_process(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"cluster.cli" in cmdline or b"redis-server" in cmdline


def replay_request(endpoint: str, header: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One request to a replay shard; its reply header (`error` for an error reply)."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    curve.connect(sock, endpoint)
    try:
        sock.send_multipart(wire.encode({**header, "req": 0}))
        if not sock.poll(int(timeout * 1000)):
            raise DeadlineExceeded(f"replay shard {endpoint} did not answer {header['op']} in {timeout:.0f}s")
        msg = wire.decode(sock.recv_multipart(), 1 << 20)
    finally:
        sock.close(0)
    reply = {k: v for k, v in msg.header.items() if k not in ("req", "arrays")}
    if msg.op == "error":
        return {"error": str(reply.get("message", reply))}
    return reply


def machine_facts() -> dict[str, Any]:
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "memory_bytes": mem,
        "platform": platform.platform(),
        "processor": platform.machine(),
    }


def _canopy_version() -> str:
    from cluster import __version__

    return __version__


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


def _started(role: str, state: bytes | None) -> bool:
    # A learner waiting as a standby is up too: on --resume the standby may take the lease
    # first, and learner 0 then waits in its place.
    return state == b"running" or (role == "learner" and state == b"standby")


def _decode(h: dict) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in h.items()}


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)
