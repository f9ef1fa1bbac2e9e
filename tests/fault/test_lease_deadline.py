"""The lease's TTL enforced on the holder's side: real holder processes, SIGSTOP, a paused Redis.

A holder that cannot renew within its TTL must consider itself fenced before a successor
can take over, by its own monotonic clock, not only when Redis next refuses its token.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, stop_process, wait_for
from redis_shards import Shards, shards_fixture

from canopy.config import LearnerConfig
from canopy.keys import Keys
from canopy.learner.algorithms.dqn import DQN
from canopy.learner.checkpoint.placement import make_plan
from canopy.learner.checkpoint.state import Capturer
from canopy.learner.checkpoint.store import CheckpointStore
from canopy.learner.checkpoint.writer import Writer
from canopy.learner.network import QNetwork
from canopy.lease import Lease
from canopy.version import Version

pytestmark = pytest.mark.fault
WORKER = Path(__file__).parent / "lease_worker.py"
TTL_S = 1.0
KEYS = Keys("lease")


shards = shards_fixture(2)


class Worker:
    """The holder process, with its stdout read on a thread so every wait can time out."""

    def __init__(self, shards: Shards, mode: str, ttl_s: float = TTL_S):
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        cmd = [sys.executable, str(WORKER), str(shards.ports[0]), str(shards.password_file), str(ttl_s), mode]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
        self.lines: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.strip()))

    def line(self, prefix: str, timeout: float) -> tuple[float, str]:
        return wait_for(
            lambda: next((x for x in self.lines if x[1].startswith(prefix)), None),
            timeout,
            0.002,
            f"worker line {prefix!r}",
        )


def test_a_holder_whose_redis_is_too_slow_to_renew_fences_itself_while_its_key_still_stands(
    shards: Shards,
) -> None:
    """Redis stalls writes (CLIENT PAUSE WRITE): renewals block while reads still answer."""
    r = shards.clients()[0]
    w = Worker(shards, "idle", ttl_s=2.0)
    try:
        _, leased = w.line("leased", 30)
        token = leased.split()[1]
        time.sleep(0.3)  # a renewal or two succeed first
        t_pause = time.monotonic()
        r.execute_command("CLIENT", "PAUSE", 6000, "WRITE")
        t_fenced, line = w.line("fenced", 5)
        _, pttl, holder, msg = line.split(" ", 3)
        # Fenced by its own clock while the key still named it with time to live: nobody
        # else could have taken over yet.
        assert holder == token and int(pttl) > 0, line
        assert "local deadline" in msg
        assert t_fenced - t_pause <= 2.0 + 0.3  # at most one TTL after the last renewal
    finally:
        r.execute_command("CLIENT", "UNPAUSE")
        stop_process(w.proc)
    # Once Redis runs again the key expires and a successor takes over with a newer epoch.
    successor = Lease(r, KEYS, learner=1, ttl_s=TTL_S)
    assert successor.acquire(timeout=10) > int(token.split(":")[0])


def test_a_holder_resumed_after_sigstop_past_its_ttl_publishes_nothing(shards: Shards) -> None:
    r = shards.clients()[0]
    w = Worker(shards, "publish")
    try:
        w.line("leased", 30)
        wait_for(lambda: r.get(KEYS.model_latest), 10, 0.01, "a first publish")
        w.proc.send_signal(signal.SIGSTOP)  # a long GC pause, a descheduled VM
        time.sleep(0.1)  # a publish already sent is applied by Redis before we look
        before = Version.parse(r.get(KEYS.model_latest))
        time.sleep(2 * TTL_S)
        w.proc.send_signal(signal.SIGCONT)
        _, line = w.line("fenced", 5)
        assert Version.parse(r.get(KEYS.model_latest)) == before
        assert "lease" in line
        assert w.proc.wait(timeout=10) == 0
    finally:
        w.proc.send_signal(signal.SIGCONT)
        stop_process(w.proc)


def test_the_writer_refuses_to_commit_once_the_local_deadline_passed(shards: Shards) -> None:
    """In-process: the commit guard alone (the lease is not renewed, so its deadline runs out)."""
    clients = shards.clients()
    keys = Keys("lease-guard")
    lease = Lease(clients[0], keys, learner=0, ttl_s=60.0)
    assert lease.try_acquire()
    lease.deadline = time.monotonic()  # as if the last renewal were sent a whole TTL ago
    store = CheckpointStore(clients, keys, make_plan(["h0", "h1"], 2), chunk_bytes=4096)
    events: list[tuple[str, dict]] = []
    writer = Writer(store, 0, lambda kind, **f: events.append((kind, f)), guard=lease.check)
    try:
        torch.manual_seed(0)
        algo = DQN(QNetwork(4, 2, [32]), LearnerConfig())
        assert writer.submit(Capturer().capture(algo, {}, {}), f"{lease.epoch}.1", lease.token)
        assert writer.wait_idle(30)
    finally:
        writer.close()
    assert [k for k, _ in events] == ["fence"]
    assert "local deadline" in events[0][1]["message"]
    assert store.committed() == []
    assert clients[0].get(keys.lease) == lease.token.encode()  # Redis alone would have allowed it
