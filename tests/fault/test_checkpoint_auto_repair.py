"""A Redis shard SIGKILLed under a checkpointing learner: the writer repairs to R copies by itself.

Real redis-server shards; the event stream is the run's real one (Telemetry on shard 0).
"""

from __future__ import annotations

import pytest
import redis
import torch
from redis_shards import Shards, shards_fixture

from cluster.config import LearnerConfig
from cluster.keys import Keys
from cluster.telemetry import Telemetry
from learner.algorithms.dqn import DQN
from learner.checkpoint.lease import Lease
from learner.checkpoint.placement import make_plan
from learner.checkpoint.state import Capturer
from learner.checkpoint.store import CheckpointStore
from learner.checkpoint.writer import Writer
from learner.network import QNetwork

pytestmark = pytest.mark.fault
KILLED = 2


shards = shards_fixture(4)


def events_of(r: redis.Redis, keys: Keys) -> list[dict[str, str]]:
    return [{k.decode(): v.decode() for k, v in f.items()} for _, f in r.xrange(keys.events, count=10_000)]


def test_a_killed_shard_triggers_repair_so_every_retained_checkpoint_has_r_copies_again(
    shards: Shards,
) -> None:
    clients = shards.clients()
    keys = Keys("auto-repair")
    lease = Lease(clients[0], keys, learner=0, ttl_s=60.0)
    assert lease.try_acquire()
    store = CheckpointStore(clients, keys, make_plan(["h0", "h1", "h2", "h3"], 2), chunk_bytes=4096, keep=3)
    tel = Telemetry(clients[0], keys, "learner", 0, 1.0)
    writer = Writer(store, 0, tel.event, guard=lease.check)
    torch.manual_seed(0)
    algo = DQN(QNetwork(4, 2, [64, 64]), LearnerConfig())
    cap = Capturer()

    def checkpoint() -> str:
        algo.updates += 1
        ckpt = f"{lease.epoch}.{algo.updates}"
        assert writer.submit(cap.capture(algo, {}, {}), ckpt, lease.token)
        assert writer.wait_idle(30)
        return ckpt

    try:
        first = checkpoint()
        assert any(KILLED in p for p in store.manifest(first)["placement"])
        shards.kill(KILLED)
        checkpoint()  # plans around the dead shard, commits, then repairs the older one
        checkpoint()  # the same shard still dead: no second repair
    finally:
        writer.close()
        tel.close()
    events = events_of(clients[0], keys)
    repairs = [e for e in events if e["kind"] == "checkpoint_repair"]
    assert len(repairs) == 1, events
    assert repairs[0]["dead_shards"] == str(KILLED) and int(repairs[0]["copies"]) > 0
    assert [e["kind"] for e in events].count("checkpoint_commit") == 3
    for ckpt in store.committed():
        m = store.manifest(ckpt)
        for i, placed in enumerate(m["placement"]):
            assert KILLED not in placed and len(set(placed)) == 2
            hosts = {store.plan.shard_hosts[s] for s in placed}
            assert len(hosts) == 2
            assert all(store._check(ckpt, i, s, m["sizes"][i], m["digests"][i]) for s in placed)
