"""`canopy up`: the embedded local cluster, every role in its own OS process.

build (ports, password, resolved config; `prepare`) -> init (Redis shards, then every role
through the same `canopy <role> --config --id` commands operators run; cluster.json once
all are up; cluster/supervisor.py) -> run (progress line, metrics.jsonl, watch for a solving
evaluation, a time limit, a dead child or a signal, restarting any role that dies, Redis
shards included; cluster/monitor.py) -> report (the newest and the best confirmed version
scored on fresh episodes, the best saved as RUN_DIR/best.safetensors, a final snapshot of
every replay shard, summary.json; cluster/report.py). `Launcher` composes the three.

Resume (`canopy up --resume RUN_DIR`): the run's resolved config is loaded back, the Redis
shards start on their append-only files in RUN_DIR/redis-<i> (cluster/redis_server.py) and
the replay shards on their snapshots in RUN_DIR/replay (`replay.snapshot_dir`), so the
learner restores its newest checkpoint under a new, larger epoch and trains on the replay
contents it left. Only the addresses are new: ports are picked again.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import sys
import time
from pathlib import Path
from typing import Any

from canopy import acl, curve, tls
from canopy import config as config_mod
from canopy.cache import topology
from canopy.cluster import redis_server
from canopy.cluster.monitor import Monitor, active_learner
from canopy.cluster.progress import waiting
from canopy.cluster.report import Report, snapshot_replay, write_json
from canopy.cluster.supervisor import Supervisor
from canopy.config import Config
from canopy.envs import check_env_id
from canopy.errors import UserError
from canopy.keys import Keys
from canopy.ports import free_ports
from canopy.redisconn import role_password_file, tls_dir


class Launcher:
    """One local run: its processes, what they report while running, and the final report.

    Example:
        launcher = Launcher(cfg)  # prepares the run directory
        launcher.start()
        launcher.monitor.run(stop_flag)
        summary = launcher.finish()
        launcher.supervisor.shutdown()
    """

    def __init__(self, cfg: Config, resume: bool = False) -> None:
        self.cfg = cfg
        self.resume = resume
        # The run's clock starts before the build: wall_s counts start-up too.
        self.t0 = time.monotonic()
        self.started_at = time.time()
        self.run_dir, config_path = prepare(cfg, resume)
        keys = Keys(cfg.run.name)
        self.supervisor = Supervisor(cfg, self.run_dir, config_path, keys)
        self.monitor = Monitor(self.supervisor, self.t0, self.started_at)
        self.report = Report(cfg, self.supervisor.r, keys, resume, self.t0, self.started_at)

    def start(self) -> None:
        """Start the Redis shards, then every other role; write cluster.json once all run."""
        self.supervisor.start_redis()
        self.monitor.skip_earlier_events()  # before this run's roles write theirs
        self.supervisor.start_roles(self.resume)
        write_json(self.run_dir / "cluster.json", self.supervisor.describe())

    def finish(self) -> dict[str, Any]:
        """Stop the producers, score the handed-over versions, write and return summary.json."""
        last = self.monitor.snapshot()
        active = active_learner(self.supervisor.r, self.supervisor.keys)  # before the stop releases its lease
        self.supervisor.stop_roles(("actor", "learner"))
        # Read now: the stats hash expires three heartbeats after the learner stopped, and
        # the evaluator's last verdict and the final evaluation may take longer than that.
        learner = self.monitor.stats("learner", active)
        # The evaluator too: it finishes the verdict in hand, so the pinned best is final.
        self.supervisor.stop_roles(("evaluator",))
        self.monitor.drain_verdicts()
        with waiting("scoring the newest and the best confirmed version"):
            final = self.report.handover()
        snapshots = snapshot_replay(self.supervisor.role("replay"))
        verdicts = self.monitor.verdicts
        solve = (verdicts.solve if verdicts else None) or {}
        summary = self.report.summary(solve, self.monitor.stop_reason, final, learner, last, snapshots)
        write_json(self.run_dir / "summary.json", summary)
        return summary


def up(cfg: Config, resume: bool = False) -> dict[str, Any]:
    """Run a local cluster until solved, out of time, or signalled; returns summary.json's content.

    `resume`: `cfg` is the config.toml of a stopped run (see the module docstring).
    """
    curve.use(curve.load(cfg.cluster, curve.OPERATOR))  # for its own requests to the replay shards
    launcher = Launcher(cfg, resume)
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
        launcher.monitor.run(stop_flag)
        return launcher.finish()
    finally:
        launcher.supervisor.shutdown()
        for s, handler in old.items():
            signal.signal(s, handler)


def prepare(cfg: Config, resume: bool) -> tuple[Path, Path]:
    """Resolve `cfg` for a local run (addresses, passwords, run directory); save its config.toml.

    Returns the run directory and the config.toml path every role is started with.
    """
    redis_server.binary()
    check_env_id(cfg.env.id)
    if not cfg.run.name:
        cfg.run.name = time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)
    run_dir = Path(cfg.run.dir or Path("runs") / cfg.run.name).resolve()
    if resume:
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
    c.role_users = True  # every role its own least-privilege Redis user (canopy/acl.py)
    c.actor_users = True  # and every actor its own, that may write only its own keys
    users = [*(r for r in acl.ROLES if r != "actor"), *(acl.actor_user(i) for i in range(cfg.actors.count))]
    if c.tls and not (resume and (tls_dir(c) / tls.CA_CERT).exists()):  # clients of a resumed run keep theirs
        tls.generate(tls_dir(c), [host])
    for path in [Path(c.password_file)] + [role_password_file(c, user) for user in users]:
        if not (resume and path.exists()):  # operators of a resumed run keep theirs
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(24))
    config_path = run_dir / "config.toml"
    config_mod.save(cfg, config_path)
    return run_dir, config_path


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
