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

Resume from a connection (`canopy up --resume --redis HOST:PORT ... --password-file F`, or
`--resume --config cluster.toml`): a run of any launcher (compose, Kubernetes, Ray) continues
on this machine. Its config comes from `run:config` (or the TOML), with this machine's own
cluster section; its newest checkpoint that loads completely is read from the deployment's
shards (`adopt`) and committed into the new local shards under a lease of its own before
any role starts (`Launcher.start`), so the learner restores it as after a local restart.
The replay contents and the confirmed best stay with the deployment.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis
import tomli_w

from canopy import acl, curve, tls
from canopy import config as config_mod
from canopy.cache import topology
from canopy.cluster import redis_server
from canopy.cluster.connection import Target, require_config
from canopy.cluster.monitor import Monitor, active_learner
from canopy.cluster.progress import waiting
from canopy.cluster.report import Report, snapshot_replay, write_json
from canopy.cluster.supervisor import Supervisor
from canopy.config import Config, to_dict
from canopy.envs import check_env_id
from canopy.errors import UserError
from canopy.keys import Keys
from canopy.lease import Lease
from canopy.ports import free_ports
from canopy.redisconn import role_password_file, tls_dir
from canopy.version import Version

# The lease the launcher holds while it commits an adopted checkpoint: far longer than a
# local commit takes; it is deleted right after, before any learner starts.
ADOPT_LEASE_S = 120.0

if TYPE_CHECKING:
    from canopy.learner.checkpoint.store import Loaded


class Launcher:
    """One local run: its processes, what they report while running, and the final report.

    Example:
        launcher = Launcher(cfg)  # prepares the run directory
        launcher.start()
        launcher.monitor.run(stop_flag)
        summary = launcher.finish()
        launcher.supervisor.shutdown()
    """

    def __init__(self, cfg: Config, resume: bool = False, adopted: Loaded | None = None) -> None:
        self.cfg = cfg
        self.resume = resume
        self.adopted = adopted  # a deployment's checkpoint to start from (`adopt`)
        # The run's clock starts before the build: wall_s counts start-up too.
        self.t0 = time.monotonic()
        self.started_at = time.time()
        self.run_dir, config_path = prepare(cfg, resume)
        keys = Keys(cfg.run.name)
        self.supervisor = Supervisor(cfg, self.run_dir, config_path, keys)
        self.monitor = Monitor(self.supervisor, self.t0, self.started_at)
        resumed = resume or adopted is not None
        self.report = Report(cfg, self.supervisor.r, keys, resumed, self.t0, self.started_at)

    def start(self) -> None:
        """Start the Redis shards, then every other role; write cluster.json once all run."""
        self.supervisor.start_redis()
        if self.adopted is not None:
            commit_adopted(self.cfg, self.supervisor.r, self.adopted)
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


def up(cfg: Config, resume: bool = False, adopted: Loaded | None = None) -> dict[str, Any]:
    """Run a local cluster until solved, out of time, or signalled; returns summary.json's content.

    `resume`: `cfg` is the config.toml of a stopped run; `adopted`: a deployment's checkpoint
    to start from, with `cfg` from `adopt` (see the module docstring).
    """
    curve.use(curve.load(cfg.cluster, curve.OPERATOR))  # for its own requests to the replay shards
    launcher = Launcher(cfg, resume, adopted)
    verb = "resuming run" if resume or adopted is not None else "run"
    return drive(launcher, f"canopy: {verb} {cfg.run.name} in {launcher.run_dir}", "starting every role")


def drive(launcher: Launcher, banner: str, starting: str) -> dict[str, Any]:
    """Start every role of `launcher`, watch the run until it ends or SIGINT/SIGTERM asks it to
    stop, and return summary.json's content; whatever still runs is stopped, also on an error.
    `canopy up` and `canopy up --ray` (cluster/ray_launch.py) share it."""
    stop_flag = [False]

    def on_signal(signum: int, frame: object) -> None:
        stop_flag[0] = True

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        print(banner, file=sys.stderr)
        with waiting(starting):
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


def adopt(target: Target, overrides: list[str]) -> tuple[Config, Loaded]:
    """The config and newest complete checkpoint of the run `target` names,
    to continue here: the run's own settings and name, this machine's cluster section
    (addresses, secrets, `canopy up`'s defaults), a new run directory."""
    from canopy.learner.checkpoint.placement import make_plan, shard_hosts_of
    from canopy.learner.checkpoint.store import CheckpointStore

    require_config(target, "--resume from a connection")
    clients = target.clients("resume")
    plan = make_plan(shard_hosts_of([], target.cfg.cluster.redis), 1)  # reads only: never used
    try:
        loaded = CheckpointStore(clients, target.keys, plan).recover()
    finally:
        for r in clients:
            r.close()
    if loaded is None:
        raise UserError(
            f"run {target.keys.run} has no checkpoint that loads completely from {target.where()}: "
            "pass every Redis shard with --redis, or wait for the learner's first checkpoint"
        )
    data = to_dict(target.cfg)
    data["cluster"] = {}  # the deployment's addresses, secrets and CURVE keys are not this machine's
    data["run"]["dir"] = ""
    data["replay"]["snapshot_dir"] = ""
    data["checkpoint"].update(shard_hosts=[], learner_host="")  # host labels of the deployment
    cfg = config_mod.loads(tomli_w.dumps(data), overrides, f"the config of run {target.keys.run}")
    return cfg, loaded


def commit_adopted(cfg: Config, r: redis.Redis, loaded: Loaded) -> None:
    """Commit an adopted checkpoint into the fresh local shards, under the id it had, fenced by
    a lease whose epoch is above the checkpoint's (the learner's next epoch is above both)."""
    from canopy.learner.lead import make_store

    keys = Keys(cfg.run.name)
    store = make_store(cfg, 0)
    lease = Lease(r, keys, 0, ADOPT_LEASE_S, epoch_floor=lambda: Version.parse(loaded.ckpt).epoch)
    try:
        if not lease.try_acquire():
            raise UserError(f"the learner lease of run {cfg.run.name} is held in a Redis just started")
        store.write(loaded.snapshot, loaded.ckpt, lease.token, learner=0)
    finally:
        r.delete(keys.lease)  # no learner runs yet: nobody else can hold it
        for client in store.shards:
            client.close()
