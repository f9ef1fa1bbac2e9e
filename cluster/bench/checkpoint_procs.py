"""The processes of `canopy bench checkpoint`: its Redis shards and real `canopy learner`
processes, and the recovery trials that SIGKILL a learner and time its successor.

Place: checkpoint.py measures the checkpoint path beside a training loop; this starts the
shards it writes to (through `canopy redis`, as `canopy up` does, so persisted the same
way) and, for recovery, learners that restore the bench's last checkpoint from them.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from canopy import config as config_mod
from canopy import tls as canopy_tls
from canopy.cluster.bench import harness
from canopy.config import Config
from canopy.keys import Keys
from canopy.lifecycle import wait_until
from canopy.ports import free_ports
from canopy.redisconn import connect, tls_dir
from canopy.version import Version

START_TIMEOUT_S = 120.0
RECOVERY_TIMEOUT_S = 60.0


@dataclass
class Cluster:
    """The benchmark's Redis shards and learner processes; `close` ends every one of them."""

    cfg: Config
    config_path: Path
    procs: list[subprocess.Popen] = field(default_factory=list)

    def spawn(self, role: str, ident: int, *args: str) -> subprocess.Popen:
        """Start `canopy <role> --id <ident>` on the bench's config, logging to the run dir."""
        log = open(Path(self.cfg.run.dir) / f"{role}-{ident}.log", "ab")  # noqa: SIM115 (child owns it)
        cmd = harness.canopy(role, "--config", str(self.config_path), "--id", str(ident), *args)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=harness.child_env())
        log.close()
        self.procs.append(proc)
        return proc

    def clients(self) -> list[redis.Redis]:
        """A new client per Redis shard, in shard order."""
        return [connect(self.cfg.cluster, "bench", 0, shard=i) for i in range(len(self.cfg.cluster.redis))]

    def close(self) -> None:
        """SIGTERM every process, SIGKILL the ones still there after 5 s."""
        harness.stop(self.procs, 5.0)


@contextlib.contextmanager
def cluster(
    args: argparse.Namespace, workdir: Path, hidden: list[int], tls: bool = False
) -> Iterator[Cluster]:
    """The shards of `args` up under `workdir`, for a learner of `hidden` widths (the state to
    checkpoint); with `tls` the shards are TLS-only (cluster.tls) and every client verifies them."""
    cfg = Config()
    cfg.run.name = "bench-ckpt-" + os.urandom(3).hex()
    cfg.run.dir = str(workdir)
    cfg.env.id = "CartPole-v1"
    cfg.redis.shards = args.shards
    # Every shard may hold R/shards of keep+1 states plus a pending one: leave room.
    cfg.redis.maxmemory_mb = max(256, int(args.state_mb * 4 * args.replicas))
    cfg.learner.hidden = hidden
    # A plain MLP, the state hidden_for and trainer_params size; the learners restore the same.
    cfg.learner.layer_norm = False
    cfg.learner.device = "cpu"
    cfg.learner.threads = 1
    cfg.learner.batch_size = args.batch
    ck = cfg.checkpoint
    ck.replicas, ck.every_s, ck.keep = args.replicas, args.period, 2
    ck.shard_hosts = [f"host{i % args.hosts}" for i in range(args.shards)]
    ports = free_ports(args.shards + 1)
    cfg.cluster.redis = [f"127.0.0.1:{p}" for p in ports[:-1]]
    # No replay shard listens here: a recovered learner publishes, then waits in sampling.
    cfg.cluster.replay = [f"tcp://127.0.0.1:{ports[-1]}"]
    pw = workdir / "redis.password"
    fd = os.open(pw, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(os.urandom(18).hex())
    cfg.cluster.password_file = str(pw)
    cfg.cluster.tls = tls
    if tls:  # tls/ beside the password file, as canopy up lays it
        canopy_tls.generate(tls_dir(cfg.cluster), ["127.0.0.1"])
    config_path = workdir / "config.toml"
    config_mod.save(cfg, config_path)
    c = Cluster(cfg, config_path)
    try:
        for i in range(args.shards):
            c.spawn("redis", i)
        for r in c.clients():
            harness.wait_redis(r, 15)
            r.close()
        yield c
    finally:
        c.close()


def _newer(r: redis.Redis, keys: Keys, epoch: int) -> Version | None:
    v = harness.latest_version(r, keys)
    return v if v is not None and v.epoch > epoch else None


def _restores(r: redis.Redis, keys: Keys) -> list[dict[str, str]]:
    return [e for _, e in harness.read_events(r, keys, "restore")]


def recovery_trial(c: Cluster, r: redis.Redis, keys: Keys, warm: bool) -> dict[str, Any]:
    """Start a primary (and a standby when warm), SIGKILL the primary, time the takeover."""
    before = harness.latest_version(r, keys)
    primary = c.spawn("learner", 0)
    standby = None
    try:
        first = wait_until(
            lambda: _newer(r, keys, before.epoch if before else 0),
            START_TIMEOUT_S,
            "the learner's first version",
        )
        if warm:
            # Started once the primary holds the lease, so the primary is the one killed.
            standby = c.spawn("learner", 1, "--standby")
            wait_until(
                lambda: r.hget(keys.proc("learner", 1), "state") == b"standby",
                START_TIMEOUT_S,
                "the standby to be built",
            )
        time.sleep(0.5)  # a few lease renewals, as in a running learner
        n_restores = len(_restores(r, keys))
        primary.send_signal(signal.SIGKILL)
        t_kill = time.monotonic()
        primary.wait(timeout=10)
        successor = standby if standby is not None else c.spawn("learner", 0)
        after = wait_until(
            lambda: _newer(r, keys, first.epoch), RECOVERY_TIMEOUT_S, "a version of a newer epoch", 0.002
        )
        seconds = time.monotonic() - t_kill
        restores = _restores(r, keys)[n_restores:]
        return {
            "seconds": round(seconds, 3),
            "killed_version": str(first),
            "new_version": str(after),
            "restored": restores[0]["ckpt"] if restores else None,
            "restore_s": float(restores[0]["seconds"]) if restores else None,
            "prefetched": restores[0].get("prefetched") == "1" if restores else False,
            "successor_pid": successor.pid,
        }
    finally:
        for p in (primary, standby):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(timeout=10)
        # Whoever took over dies too: the next trial starts from a free lease.
        for p in c.procs:
            if p.args[3] == "learner" and p.poll() is None:
                p.kill()
                p.wait(timeout=10)
        wait_until(lambda: not r.exists(keys.lease), 10, "the lease to expire")
