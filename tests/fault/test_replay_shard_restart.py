"""A replay shard killed while it holds an actor's inserts back, and restarted on the same
endpoint before it could leave membership (what `canopy up` does): the actor's chunks in
flight died with it, so its InsertClient must drop them and go on, not wait for acks that
will never come until its timeout kills the actor.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import RedisServer, free_port, start_role, stop_process, wait_for

from canopy import config as config_mod
from canopy.errors import DeadlineExceeded
from canopy.keys import Keys
from canopy.replay.connect import request_stats
from canopy.replay.insert import InsertClient
from canopy.replay.sample import SampleClient

pytestmark = pytest.mark.fault

CHUNK = 10
TIMEOUT_S = 15.0


def chunk() -> dict[str, np.ndarray]:
    return {
        "obs": np.zeros((CHUNK, 4), np.float32),
        "action": np.zeros(CHUNK, np.int64),
        "reward": np.ones(CHUNK, np.float32),
        "next_obs": np.zeros((CHUNK, 4), np.float32),
        "discount": np.full(CHUNK, 0.99, np.float32),
        "version": np.zeros(CHUNK, np.int64),
    }


class Shard:
    """`canopy replay --id 0` of a one-shard config; killed or stopped at teardown."""

    def __init__(self, cfg_path: Path, log: Path):
        self.cfg_path, self.log, self.proc = cfg_path, log, None

    def start(self) -> subprocess.Popen:
        self.proc = start_role("replay", self.cfg_path, 0, self.log)
        return self.proc

    def start_answering(self, endpoint: str, what: str) -> subprocess.Popen:
        """Start, then wait until it answers stats (or exits: the caller checks)."""
        proc = self.start()
        wait_for(lambda: answering(endpoint) or proc.poll() is not None, TIMEOUT_S, 0.1, what)
        return proc

    def kill_and_restart(self, proc: subprocess.Popen, endpoint: str) -> subprocess.Popen:
        """SIGKILL `proc` and start again on the same endpoint, as `canopy up` does."""
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        return self.start_answering(endpoint, "the restart")


@pytest.fixture
def shard(redis_server: RedisServer, run_keys: Keys, tmp_path: Path) -> Iterator[tuple[Shard, str]]:
    cfg = config_mod.Config()
    cfg.run.name = run_keys.run
    cfg.cluster = redis_server.cluster_config()
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    cfg.cluster.replay = [endpoint]
    # Inserts are held back once they run 26 items ahead of what was sampled: never sampled here.
    cfg.replay.min_size, cfg.replay.samples_per_insert, cfg.replay.error_buffer = 10, 1.0, 16.0
    path = tmp_path / "config.toml"
    config_mod.save(cfg, path)
    s = Shard(path, tmp_path / "replay-0.log")
    try:
        yield s, endpoint
    finally:
        if s.proc is not None:
            stop_process(s.proc, timeout=5)


def answering(endpoint: str) -> bool:
    try:
        request_stats(endpoint, timeout=0.5)
    except DeadlineExceeded:
        return False
    return True


def test_an_insert_client_drops_what_a_restarted_shard_lost_and_inserts_again(
    shard: tuple[Shard, str],
) -> None:
    s, endpoint = shard
    first = s.start_answering(endpoint, "the shard")
    assert first.poll() is None, s.log.read_text()[-2000:]
    client = InsertClient(endpoint, inflight=2)
    try:
        with pytest.raises(DeadlineExceeded):  # 30 items acked, then two chunks parked
            for _ in range(10):
                client.insert(chunk(), timeout=1.0)
        assert client.inflight == 2
        s.kill_and_restart(first, endpoint)
        client.insert(chunk(), timeout=TIMEOUT_S)  # before the fix: blocked until the timeout
        client.flush(timeout=TIMEOUT_S)
        assert client.chunks_dropped_total == 2
        assert request_stats(endpoint, timeout=5.0)["main_items"] == CHUNK
    finally:
        client.close()


def test_a_sample_client_asks_a_restarted_shard_again_instead_of_waiting_for_lost_requests(
    shard: tuple[Shard, str],
) -> None:
    s, endpoint = shard
    first = s.start_answering(endpoint, "the shard")
    assert first.poll() is None, s.log.read_text()[-2000:]
    inserter = InsertClient(endpoint, inflight=1)
    sampler = SampleClient([endpoint], batch=4, inflight=2)
    try:
        inserter.insert(chunk(), timeout=TIMEOUT_S)
        inserter.flush(timeout=TIMEOUT_S)
        # 10 items at one sample per insert: the limiter lets 16 be sampled (down to
        # 10 - 16 = -6, its floor), then holds the next requests at the shard, where they
        # die with it.
        for _ in range(4):
            assert sampler.next(timeout=TIMEOUT_S) is not None
        s.kill_and_restart(first, endpoint)
        refill = InsertClient(endpoint, inflight=1)
        try:
            refill.insert(chunk(), timeout=TIMEOUT_S)
            refill.flush(timeout=TIMEOUT_S)
        finally:
            refill.close()
        # Before the fix: the one shard stayed drawn with requests nobody would answer.
        batch = sampler.next(timeout=TIMEOUT_S)
        assert batch is not None and len(batch["slot"]) == 4
    finally:
        inserter.close()
        sampler.close()
