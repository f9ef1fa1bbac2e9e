"""Replay snapshots with real processes: a `canopy replay` shard is snapshotted, killed
with SIGKILL, restarted, and must hold the same items, priorities and limiter state; a
SIGTERM writes one last snapshot; a shard keeps serving while its snapshot is written."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq
from conftest import RedisServer, free_port, start_role, stop_process, wait_for

from canopy import config as config_mod
from canopy import wire
from canopy.cluster.bench.replay_procs import PixelStream
from canopy.config import ReplayConfig
from canopy.errors import ProtocolError
from canopy.keys import Keys
from canopy.replay import protocol, snapshot
from canopy.replay.connect import request_stats
from canopy.replay.insert import InsertClient
from canopy.replay.sample import SampleClient
from canopy.replay.server import ReplayServer

TIMEOUT_S = 20.0
FRAME = (4, 4)


def transitions(ids: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "obs": np.repeat(ids[:, None], 4, axis=1).astype(np.float32),
        "action": ids.astype(np.int64),
        "priority": (ids % 5 + 1).astype(np.float64),
    }


def pixel_episode(first: int, length: int) -> dict[str, np.ndarray]:
    """One episode: frames first..first+length, a transition between each pair."""
    keys = np.arange(first, first + length + 1, dtype=np.int64)
    return {
        "frame": np.stack([np.full(FRAME, k % 256, np.uint8) for k in keys]),
        "frame_key": keys,
        "frame_prev": np.concatenate([[first], keys[:-1]]),
        "obs": keys[:-1],
        "next_obs": keys[1:],
    }


class Shard:
    """One `canopy replay --id 0` process at a time; always stopped at teardown."""

    def __init__(self, cfg_path: Path, endpoint: str, log: Path):
        self.cfg_path, self.endpoint, self.log_path = cfg_path, endpoint, log
        self.proc: subprocess.Popen | None = None

    def start(self) -> dict:
        self.proc = start_role("replay", self.cfg_path, 0, self.log_path)
        return wait_for(self._stats, TIMEOUT_S, what="replay shard answering stats")

    def _stats(self) -> dict | None:
        assert self.proc.poll() is None, self.log()
        try:
            return request_stats(self.endpoint, timeout=0.5)
        except Exception:  # not bound yet
            return None

    def stats(self) -> dict:
        return request_stats(self.endpoint, timeout=TIMEOUT_S)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=TIMEOUT_S)


@pytest.fixture
def shard(redis_server: RedisServer, run_keys: Keys, tmp_path: Path) -> Iterator[Shard]:
    cfg = config_mod.Config()
    cfg.run.name = run_keys.run
    cfg.cluster = redis_server.cluster_config()
    cfg.cluster.replay = [f"tcp://127.0.0.1:{free_port()}"]
    cfg.replay.capacity = 500
    cfg.replay.min_size = 1
    cfg.replay.samples_per_insert = 2.0
    cfg.replay.error_buffer = 5000.0
    cfg.replay.sampler = "prioritized"
    cfg.replay.priority_exponent = 1.0
    cfg.replay.extra_tables = ["pix:uniform:fifo"]
    cfg.replay.snapshot_dir = str(tmp_path / "snaps")
    cfg.replay.snapshot_interval_s = 3600.0  # only on request and on SIGTERM here
    path = tmp_path / "config.toml"
    config_mod.save(cfg, path)
    s = Shard(path, cfg.cluster.replay[0], tmp_path / "replay-0.log")
    try:
        yield s
    finally:
        s.stop()


def insert(endpoint: str, arrays: dict[str, np.ndarray], table: str | None = None) -> None:
    client = InsertClient(endpoint, inflight=4, table=table)
    try:
        client.insert(arrays, timeout=TIMEOUT_S)
        client.flush(timeout=TIMEOUT_S)
    finally:
        client.close()


def sample(endpoint: str, batches: int, table: str | None = None) -> list[dict[str, np.ndarray]]:
    client = SampleClient([endpoint], batch=32, inflight=1, table=table)
    try:
        return [client.next(timeout=TIMEOUT_S) for _ in range(batches)]
    finally:
        client.close()


KEPT = ("main_items", "main_inserted_total", "main_limiter_diff", "main_priority_updates_total")


@pytest.mark.slow
def test_a_killed_shard_restores_items_priorities_and_limiter_from_its_snapshot(shard: Shard):
    shard.start()
    ids = np.arange(600)  # 100 more than the capacity: the oldest were evicted
    insert(shard.endpoint, transitions(ids))
    insert(shard.endpoint, pixel_episode(1, 30), table="pix")
    priority = {int(i): float(i % 5 + 1) for i in ids[100:]}
    client = SampleClient([shard.endpoint], batch=32, inflight=1)
    batch = client.next(timeout=TIMEOUT_S)
    new = np.arange(len(batch["slot"]), dtype=np.float64) + 10.0
    client.update_priorities(0, batch["slot"], batch["gen"], new)
    for action, p in zip(batch["action"].tolist(), new.tolist(), strict=True):
        priority[action] = p  # the last update of a duplicate wins, as on the shard
    client.close()
    wait_for(lambda: shard.stats()["main_priority_updates_total"] == 32, TIMEOUT_S, what="updates applied")
    before = shard.stats()

    reply = snapshot.request(shard.endpoint, timeout=TIMEOUT_S)
    assert reply["ok"] and reply["seq"] == 1, reply
    insert(shard.endpoint, transitions(np.arange(1000, 1010)))  # after the snapshot: lost
    shard.proc.send_signal(signal.SIGKILL)
    shard.proc.wait(timeout=TIMEOUT_S)

    after = shard.start()
    assert {k: after[k] for k in KEPT} == {k: before[k] for k in KEPT}
    assert after["main_priority_total"] == pytest.approx(sum(priority.values()))
    assert "restored" in shard.log()
    for got in sample(shard.endpoint, 5):
        actions = got["action"].tolist()
        np.testing.assert_array_equal(got["obs"][:, 0], got["action"].astype(np.float32))
        want = np.array([priority[a] for a in actions]) / sum(priority.values())
        np.testing.assert_allclose(got["prob"], want, rtol=1e-9)  # per-item priorities kept
    for got in sample(shard.endpoint, 2, table="pix"):
        newest = got["next_obs"][:, -1, 0, 0].astype(np.int64)
        stack = got["next_obs"][:, :, 0, 0].astype(np.int64)
        want = np.maximum(newest[:, None] + np.arange(-3, 1), 1)  # the episode start repeats
        np.testing.assert_array_equal(stack, want)


@pytest.mark.slow
def test_sigterm_writes_a_last_snapshot_that_the_next_start_loads(shard: Shard):
    shard.start()
    insert(shard.endpoint, transitions(np.arange(50)))
    before = shard.stats()
    stop_process(shard.proc, timeout=TIMEOUT_S)
    assert shard.proc.returncode == 0, shard.log()
    after = shard.start()
    assert after["main_items"] == before["main_items"] == 50
    assert after["main_limiter_diff"] == before["main_limiter_diff"]


@pytest.mark.slow
def test_samples_are_served_while_a_snapshot_is_being_written(tmp_path: Path):
    cfg = ReplayConfig(min_size=1, samples_per_insert=0.0, capacity=5000, frame_window=1024)
    server = ReplayServer(cfg, snapshot_dir=tmp_path)
    stream = PixelStream(1)
    for _ in range(5000 // 250):  # 35 MB of frames: a write that takes a while
        server.table.insert(stream.chunk(250))
    endpoint = server.bind("tcp://127.0.0.1:0")
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, args=(stop,), daemon=True)
    thread.start()
    asker = zmq.Context.instance().socket(zmq.DEALER)
    asker.setsockopt(zmq.LINGER, 0)
    asker.connect(endpoint)
    sampler = SampleClient([endpoint], batch=8, inflight=1)
    try:
        sampler.next(timeout=TIMEOUT_S)
        asker.send_multipart(wire.encode(protocol.snapshot_request(req=1)))
        served = 0
        deadline = time.monotonic() + TIMEOUT_S
        while not asker.poll(0):  # a server that blocked while writing would serve none
            assert time.monotonic() < deadline, "no snapshot reply"
            sampler.next(timeout=TIMEOUT_S)
            served += 1
        reply = wire.decode(asker.recv_multipart(), 2**20).header
    finally:
        sampler.close()
        asker.close(0)
        stop.set()
        thread.join(timeout=TIMEOUT_S)
    assert reply["ok"], reply
    assert served >= 5, (served, reply)
    # How long the fork paused serving is a figure for `canopy bench replay`, not a check
    # here: it grows with the forking process's memory (this one is the whole test run).
    assert reply["pause_ms"] >= 0 and reply["seconds"] > 0, reply


def test_a_snapshot_request_to_a_shard_without_a_directory_says_how_to_turn_them_on():
    server = ReplayServer(ReplayConfig(min_size=1))
    endpoint = server.bind("tcp://127.0.0.1:0")
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, args=(stop,), daemon=True)
    thread.start()
    try:
        with pytest.raises(ProtocolError, match=r"set replay\.snapshot_dir"):
            snapshot.request(endpoint, timeout=TIMEOUT_S)
    finally:
        stop.set()
        thread.join(timeout=TIMEOUT_S)
