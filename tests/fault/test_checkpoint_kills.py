"""SIGKILL a checkpoint writer mid-transfer and mid-commit, and resume a fenced learner: real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT, stop_process
from redis_shards import Shards, shards_fixture

from canopy.keys import Keys
from canopy.learner.checkpoint.placement import make_plan
from canopy.learner.checkpoint.store import CheckpointStore
from canopy.lease import Lease

pytestmark = pytest.mark.fault
WORKER = Path(__file__).parent / "ckpt_worker.py"


shards = shards_fixture(3)


def worker(shards: Shards, mode: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    cmd = [sys.executable, str(WORKER), ",".join(map(str, shards.ports)), str(shards.password_file), mode]
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)


def read_until(proc: subprocess.Popen, prefix: str) -> str:
    """Read the worker's lines until one starts with `prefix` (the worker itself times out)."""
    while True:
        line = proc.stdout.readline()
        assert line, f"worker exited before printing {prefix!r}"
        if line.startswith(prefix):
            return line.strip()


def store_of(shards: Shards) -> CheckpointStore:
    plan = make_plan(["h0", "h1", "h2"], 2)
    return CheckpointStore(shards.clients(), Keys("fault"), plan, chunk_bytes=16384)


@pytest.mark.parametrize(("mode", "kill_after"), [("transfer", "chunk 3"), ("commit", "acked-all")])
def test_killing_the_writer_mid_checkpoint_restores_the_previous_checkpoint(
    shards: Shards, mode: str, kill_after: str
) -> None:
    proc = worker(shards, mode)
    try:
        read_until(proc, "committed-A")
        read_until(proc, kill_after)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        store = store_of(shards)
        loaded = store.recover()
        assert loaded is not None and loaded.ckpt.endswith(".1")
        assert len(store.committed()) == 1
    finally:
        stop_process(proc)


def test_a_fenced_learner_that_comes_back_can_neither_publish_nor_commit(shards: Shards) -> None:
    proc = worker(shards, "fenced")
    try:
        read_until(proc, "leased")
        proc.send_signal(signal.SIGSTOP)  # a long GC pause, or a partition
        lease = Lease(shards.clients()[0], Keys("fault"), learner=1, ttl_s=60)
        lease.acquire(timeout=10)  # the old lease expires; the successor takes a newer epoch
        proc.send_signal(signal.SIGCONT)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert read_until(proc, "fenced-") == "fenced-publish"
        assert read_until(proc, "fenced-") == "fenced-commit"
        assert shards.clients()[0].get(Keys("fault").model_latest) is None
        assert store_of(shards).committed() == []
    finally:
        proc.send_signal(signal.SIGCONT)
        stop_process(proc)
