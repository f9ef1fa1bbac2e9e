"""Priority updates fenced by the learner's lease epoch, against a real `canopy replay` process.

A learner that lost its lease (paused, partitioned, replaced by a standby under a newer
epoch) may come back and send priorities for items it sampled long ago; once the shard has
heard from a newer epoch it drops them, counts them in its stats (the Redis stats hash an
operator reads), and keeps serving the live learner. The newest epoch survives a restart
from the shard's snapshot.
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
from canopy.keys import Keys
from canopy.replay import snapshot
from canopy.replay.connect import request_stats
from canopy.replay.insert import InsertClient
from canopy.replay.sample import SampleClient

pytestmark = pytest.mark.fault

TIMEOUT_S = 20.0
BATCH = 16


class Shard:
    """`canopy replay --id 0` with snapshots on request; stopped at teardown."""

    def __init__(self, cfg_path: Path, endpoint: str, log: Path):
        self.cfg_path, self.endpoint, self.log = cfg_path, endpoint, log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = start_role("replay", self.cfg_path, 0, self.log)
        wait_for(self._answers, TIMEOUT_S, 0.1, "the replay shard answering stats")

    def _answers(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, self.log.read_text()[-3000:]
        try:
            request_stats(self.endpoint, timeout=0.5)
        except Exception:  # not bound yet
            return False
        return True

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=TIMEOUT_S)

    def counter(self, name: str) -> int:
        return int(request_stats(self.endpoint, timeout=TIMEOUT_S)[name])

    def wait_counter(self, name: str, value: int) -> None:
        wait_for(lambda: self.counter(name) == value, TIMEOUT_S, 0.05, f"{name} == {value}")


@pytest.fixture
def shard(redis_server: RedisServer, run_keys: Keys, tmp_path: Path) -> Iterator[Shard]:
    cfg = config_mod.Config()
    cfg.run.name = run_keys.run
    cfg.run.heartbeat_s = 0.5
    cfg.cluster = redis_server.cluster_config()
    cfg.cluster.replay = [f"tcp://127.0.0.1:{free_port()}"]
    cfg.replay.sampler = "prioritized"
    cfg.replay.min_size, cfg.replay.samples_per_insert, cfg.replay.error_buffer = 1, 1.0, 1e6
    cfg.replay.snapshot_dir = str(tmp_path / "snaps")
    cfg.replay.snapshot_interval_s = 3600.0  # only on request
    path = tmp_path / "config.toml"
    config_mod.save(cfg, path)
    s = Shard(path, cfg.cluster.replay[0], tmp_path / "replay-0.log")
    try:
        yield s
    finally:
        if s.proc is not None:
            stop_process(s.proc, timeout=TIMEOUT_S)


def fill(endpoint: str) -> None:
    n = 64
    client = InsertClient(endpoint, inflight=2)
    try:
        client.insert({"obs": np.zeros((n, 4), np.float32), "action": np.zeros(n, np.int64)}, TIMEOUT_S)
        client.flush(TIMEOUT_S)
    finally:
        client.close()


def learner(endpoint: str, epoch: int) -> tuple[SampleClient, dict[str, np.ndarray]]:
    """A learner's sample client of lease epoch `epoch` and one batch it drew."""
    client = SampleClient([endpoint], batch=BATCH, inflight=1, epoch=epoch)
    batch = client.next(timeout=TIMEOUT_S)
    assert batch is not None
    return client, batch


def send(client: SampleClient, batch: dict[str, np.ndarray], priority: float) -> None:
    client.update_priorities(0, batch["slot"], batch["gen"], np.full(BATCH, priority))


def test_a_shard_drops_and_counts_a_fenced_learners_priority_updates_even_after_a_restart(
    shard: Shard, redis_client, run_keys: Keys
) -> None:
    shard.start()
    fill(shard.endpoint)
    clients = []
    try:
        old, old_batch = learner(shard.endpoint, 1)
        rank0, rank0_batch = learner(shard.endpoint, 2)
        rank1, rank1_batch = learner(shard.endpoint, 2)  # a learner group: its ranks share an epoch
        clients += [old, rank0, rank1]
        send(old, old_batch, 5.0)  # nobody newer has spoken yet: applies
        shard.wait_counter("priority_updates_total", BATCH)
        send(rank0, rank0_batch, 2.0)
        shard.wait_counter("priority_updates_total", 2 * BATCH)
        assert shard.counter("priority_epoch") == 2

        send(old, old_batch, 1e6)  # epoch 1 comes back after epoch 2 spoke
        shard.wait_counter("priority_updates_fenced_total", BATCH)
        send(rank1, rank1_batch, 3.0)
        shard.wait_counter("priority_updates_total", 3 * BATCH)  # epoch 2's still apply
        stats = request_stats(shard.endpoint, timeout=TIMEOUT_S)
        assert stats["priority_updates_fenced_total"] == BATCH and stats["rejected_total"] == 0
        # What an operator reads with redis-cli (or `canopy status`): the shard's stats hash.
        key = run_keys.proc("replay", 0)
        wait_for(
            lambda: redis_client.hget(key, "priority_updates_fenced_total") == str(BATCH).encode(),
            TIMEOUT_S,
            0.1,
            "the fenced count in the shard's stats hash",
        )

        snapshot.request(shard.endpoint, timeout=TIMEOUT_S)
        shard.kill()
        shard.start()
        assert shard.counter("priority_epoch") == 2  # restored from the snapshot
        back, back_batch = learner(shard.endpoint, 1)  # the stale learner, reconnected
        clients.append(back)
        send(back, back_batch, 1e6)
        shard.wait_counter("priority_updates_fenced_total", BATCH)
        assert shard.counter("priority_updates_total") == 0
    finally:
        for client in clients:
            client.close()
