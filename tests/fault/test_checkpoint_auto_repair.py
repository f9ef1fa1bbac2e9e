"""A Redis shard SIGKILLed under a checkpointing learner: the writer repairs to R copies by itself,
after the next commit or, with no checkpoint being written, on its timer.

Real redis-server shards; the event stream is the run's real one (Telemetry on shard 0).
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
import redis
import torch
from conftest import wait_for
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
from canopy.telemetry import Telemetry

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
    assert repairs[0]["trigger"] == "commit"
    assert [e["kind"] for e in events].count("checkpoint_commit") == 3
    assert_r_copies_off(store, KILLED)


def assert_r_copies_off(store: CheckpointStore, killed: int) -> None:
    for ckpt in store.committed():
        m = store.manifest(ckpt)
        for i, placed in enumerate(m["placement"]):
            assert killed not in placed and len({store.plan.shard_hosts[s] for s in placed}) == 2
            assert all(store._check(ckpt, i, s, m["sizes"][i], m["digests"][i]) for s in placed)


def test_with_no_checkpoint_being_written_the_timer_repairs_a_killed_shard(shards: Shards) -> None:
    clients = shards.clients()
    keys = Keys("timer-repair")
    lease = Lease(clients[0], keys, learner=0, ttl_s=60.0)
    assert lease.try_acquire()
    store = CheckpointStore(clients, keys, make_plan(["h0", "h1", "h2", "h3"], 2), chunk_bytes=4096, keep=3)
    tel = Telemetry(clients[0], keys, "learner", 0, 1.0)
    writer = Writer(store, 0, tel.event, guard=lease.check, token=lease.token, repair_every_s=0.2)
    torch.manual_seed(0)
    algo = DQN(QNetwork(4, 2, [64, 64]), LearnerConfig())
    try:
        assert writer.submit(Capturer().capture(algo, {}, {}), f"{lease.epoch}.1", lease.token)
        assert writer.wait_idle(30)
        held = {s for p in store.manifest(f"{lease.epoch}.1")["placement"] for s in p} - {0}
        killed = min(held)  # not the root: the event stream lives there
        shards.kill(killed)

        def timer_repair() -> dict[str, str] | None:
            found = [e for e in events_of(clients[0], keys) if e["kind"] == "checkpoint_repair"]
            return found[0] if found else None

        repair = wait_for(timer_repair, 15, 0.05, "a timer-driven checkpoint_repair event")
    finally:
        writer.close()
        tel.close()
    assert repair["trigger"] == "timer" and repair["dead_shards"] == str(killed), repair
    assert int(repair["copies"]) > 0
    assert [e["kind"] for e in events_of(clients[0], keys)].count("checkpoint_commit") == 1
    assert_r_copies_off(store, killed)


def restart_empty(shards: Shards, i: int) -> None:
    """SIGKILL shard i and start a new redis-server on its port and config: it comes back empty."""
    shards.kill(i)
    conf = shards.workdir / f"redis-{i}.conf"
    log = open(shards.workdir / f"redis-{i}.restarted.log", "wb")  # noqa: SIM115 (the process owns it)
    shards.procs[i] = subprocess.Popen(
        [shutil.which("redis-server") or "/usr/bin/redis-server", str(conf)], stdout=log, stderr=log
    )
    r = shards.clients()[i]
    wait_for(lambda: _pings(r), 10, 0.02, f"shard {i} to answer again")


def _pings(r: redis.Redis) -> bool:
    try:
        return bool(r.ping())
    except redis.ConnectionError:
        return False


def test_a_shard_that_came_back_empty_between_two_checks_is_repaired(shards: Shards) -> None:
    clients = shards.clients()
    keys = Keys("restart-repair")
    lease = Lease(clients[0], keys, learner=0, ttl_s=60.0)
    assert lease.try_acquire()
    store = CheckpointStore(clients, keys, make_plan(["h0", "h1", "h2", "h3"], 2), chunk_bytes=4096, keep=3)
    tel = Telemetry(clients[0], keys, "learner", 0, 1.0)
    writer = Writer(store, 0, tel.event, guard=lease.check)
    torch.manual_seed(0)
    algo = DQN(QNetwork(4, 2, [64, 64]), LearnerConfig())
    cap = Capturer()
    try:
        for step in (1, 2):
            assert writer.submit(cap.capture(algo, {}, {}), f"{lease.epoch}.{step}", lease.token)
            assert writer.wait_idle(30)
            if step == 1:
                held = {s for p in store.manifest(f"{lease.epoch}.1")["placement"] for s in p} - {0}
                emptied = min(held)
                restart_empty(shards, emptied)  # alive again, but without its chunks
    finally:
        writer.close()
        tel.close()
    repairs = [e for e in events_of(clients[0], keys) if e["kind"] == "checkpoint_repair"]
    assert len(repairs) == 1 and repairs[0]["restarted_shards"] == str(emptied), repairs
    assert repairs[0]["dead_shards"] == "" and int(repairs[0]["copies"]) > 0
    for ckpt in store.committed():
        m = store.manifest(ckpt)
        for i, placed in enumerate(m["placement"]):
            assert len({store.plan.shard_hosts[s] for s in placed}) == 2
            assert all(store._check(ckpt, i, s, m["sizes"][i], m["digests"][i]) for s in placed)
