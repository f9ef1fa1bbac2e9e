"""The processes `canopy bench broadcast` runs: a private redis-server, cache nodes and the
workers of simulated actors (broadcast_actors.py); `Cluster.close` stops them all.

Place: broadcast.py measures, this starts and stops. With --netns every simulated host is a
network namespace of cluster/netns.py ("root" holds Redis and tier 1, "h<i>" a leaf and its
actors) and each process starts inside its host's; `enter_netns` moves the bench's own
thread into one.
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import redis
import zmq

from canopy import tls as canopy_tls
from canopy.cluster import netns, redis_server
from canopy.cluster.bench import harness
from canopy.cluster.bench.broadcast_actors import PROBE, START_TIMEOUT_S
from canopy.config import ClusterConfig
from canopy.errors import UserError
from canopy.ports import free_ports
from canopy.redisconn import tls_dir, tls_kwargs

CLONE_NEWNET = 0x40000000
WORKERS_STOP_S = 5.0  # a worker whose stdin closed gets this long to exit on its own


class Cluster:
    """A private redis-server plus every process the bench starts; `close` stops them all."""

    def __init__(self, work: Path, net: netns.Network | None = None, tls: bool = False):
        self.work, self.procs, self.net, self.tls = work, [], net, tls
        self.addr = self.address("root")
        self.password = secrets.token_urlsafe(16)
        (work / "pw").write_text(self.password)
        self.port = free_ports(1)[0]
        # With tls, Redis is TLS-only and its CA lies in tls/ beside the password, as canopy up lays it.
        cluster = ClusterConfig(password_file=str(work / "pw"), tls=tls)
        if tls:
            canopy_tls.generate(tls_dir(cluster), [self.addr])
        listen = redis_server.tls_lines(tls_dir(cluster), self.port) if tls else [f"port {self.port}"]
        conf = work / "redis.conf"
        conf.write_text(
            "\n".join(listen) + f'\nbind {self.addr}\nsave ""\nappendonly no\ndir {work}\n'
            f"user default off\nuser canopy on >{self.password} ~* &* +@all\n"
            "client-output-buffer-limit pubsub 0 0 0\nclient-output-buffer-limit normal 0 0 0\n"
            "proto-max-bulk-len 1gb\nmaxclients 20000\n"
        )
        self.redis_proc = self.spawn([shutil.which("redis-server") or "redis-server", str(conf)], out=False)
        self.r = redis.Redis(
            self.addr, self.port, username="canopy", password=self.password, **tls_kwargs(cluster)
        )
        harness.wait_redis(self.r, 10.0)

    def address(self, host: str) -> str:
        """Where processes of `host` ("root" or "h<i>") listen: its namespace's address."""
        return self.net[host].address if self.net is not None else "127.0.0.1"

    def spawn(self, cmd: list[str], out: bool = True, host: str = "root") -> subprocess.Popen:
        """Start `cmd` on `host` (its network namespace with --netns, else right here)."""
        kwargs = {
            "stdout": subprocess.PIPE if out else subprocess.DEVNULL,
            "stdin": subprocess.PIPE,
            "text": True,
            "cwd": Path(__file__).resolve().parents[2],
            "preexec_fn": harness.die_with_parent,  # nothing outlives a bench that is killed
        }
        p = self.net[host].popen(cmd, **kwargs) if self.net is not None else subprocess.Popen(cmd, **kwargs)
        self.procs.append(p)
        return p

    def node(
        self, run: str, parents: list, name: str, shm: str = "", host: str = "root"
    ) -> tuple[subprocess.Popen, list, Path]:
        """A cache node under `parents`: (its process, [fetch, notify] endpoints, its counters file)."""
        counters = self.work / f"{name}.json"
        p = self.spawn(
            [
                sys.executable,
                "-m",
                "canopy.cache.standalone",
                "--run",
                run,
                "--redis",
                f"{self.addr}:{self.port}",
                "--bind",
                f"tcp://{self.address(host)}:0",
                "--password-file",
                str(self.work / "pw"),
                "--parents",
                json.dumps(parents),
                "--name",
                name,
                "--counters",
                str(counters),
                "--set=poll_s=0.5",
                "--set=keep_versions=4",
                "--set=parent_timeout_s=5.0",  # a loaded 2-core box must not trigger failovers
                "--set=heartbeat_s=1.0",  # a beat costs every one of a host's actors a wake-up
                *(["--shm-tag", shm] if shm else []),
                *(["--tls"] if self.tls else []),
            ],
            host=host,
        )
        eps = json.loads(harness.readline(p, START_TIMEOUT_S))
        return p, [eps["fetch"], eps["notify"]], counters

    def start_workers(
        self, mode: str, actors: int, workers: int, hosts: int, setup: dict[str, Any]
    ) -> list[subprocess.Popen]:
        """Workers for `actors` actors of one arm, spread evenly over the simulated hosts."""
        procs = []
        endpoints = setup["endpoints"]
        for w, n in enumerate(split(actors, max(workers, 1))):
            if n:
                cfg = {"mode": mode, "actors": n, "endpoints": endpoints[w % len(endpoints)]}
                cfg |= {"run": setup["run"], "redis": [self.addr, self.port], "pw": str(self.work / "pw")}
                cfg |= {"tls": self.tls}
                cmd = [sys.executable, "-m", "canopy.cluster.bench.broadcast_actors", json.dumps(cfg)]
                procs.append(self.spawn(cmd, host=f"h{w % hosts}"))
        return procs

    def stop_workers(self, workers: list[subprocess.Popen]) -> None:
        """Close each worker's stdin (its signal to stop), give them WORKERS_STOP_S, then stop the rest."""
        for p in workers:
            p.stdin.close()  # a worker stops when its stdin closes
        deadline = time.monotonic() + WORKERS_STOP_S
        while any(p.poll() is None for p in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        harness.stop(workers)

    def close(self) -> None:
        """Stop every process it started, newest first (redis-server last)."""
        harness.stop(list(reversed(self.procs)))


def split(n: int, parts: int) -> list[int]:
    """`n` in `parts` near-equal shares."""
    return [n // parts + (i < n % parts) for i in range(parts)]


def wait_ready(workers: list[subprocess.Popen], pub: zmq.Socket | None) -> None:
    """Until every worker says all its actors are attached. PUB/SUB has no handshake, so
    for the PUB arms probes go out meanwhile: a worker is ready once each SUB heard one."""
    waiting = {p.stdout.fileno(): p for p in workers}
    poll = select.poll()
    for fd in waiting:
        poll.register(fd, select.POLLIN)
    deadline = time.monotonic() + START_TIMEOUT_S
    while waiting:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(waiting)} workers did not attach their actors in {START_TIMEOUT_S:g}s")
        if pub is not None:
            pub.send_multipart([PROBE, b""])
        for fd, _ in poll.poll(50):
            json.loads(harness.readline(waiting.pop(fd), START_TIMEOUT_S))
            poll.unregister(fd)


def enter_netns(target: Path | int) -> None:
    """Move this thread into the network namespace at `target` (a path, or an open fd)."""
    fd = os.open(target, os.O_RDONLY) if isinstance(target, Path) else target
    try:
        if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
            raise UserError(
                f"--netns: cannot enter network namespace {target}: {os.strerror(ctypes.get_errno())}"
            )
    finally:
        if fd is not target:
            os.close(fd)
