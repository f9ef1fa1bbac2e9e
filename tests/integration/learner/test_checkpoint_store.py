"""learner/checkpoint/store.py against real redis-server shards: commit, verify, retention, repair."""

from __future__ import annotations

import pytest
import redis
import torch
from redis_shards import Shards, shards_fixture

from canopy.config import LearnerConfig
from canopy.keys import Keys
from canopy.learner.algorithms.dqn import DQN, Batch
from canopy.learner.checkpoint.placement import make_plan
from canopy.learner.checkpoint.state import Capturer, Snapshot, restore
from canopy.learner.checkpoint.store import CheckpointFenced, CheckpointStore, Incomplete
from canopy.learner.network import QNetwork
from canopy.lease import Lease

CHUNK = 4096  # small chunks, so a tiny network still spans many of them


shards = shards_fixture(4)


def trained(steps: int, seed: int = 0) -> DQN:
    torch.manual_seed(seed)
    algo = DQN(QNetwork(4, 2, [64, 64]), LearnerConfig())
    for _ in range(steps):
        algo.update(
            Batch(
                torch.randn(16, 4),
                torch.randint(0, 2, (16,)),
                torch.randn(16),
                torch.randn(16, 4),
                torch.ones(16),
            )
        )
    return algo


def setup(shards: Shards, keep: int = 3) -> tuple[list[redis.Redis], Keys, Lease, CheckpointStore]:
    clients = shards.clients()
    keys = Keys("ckpt-test")
    lease = Lease(clients[0], keys, learner=0, ttl_s=60.0)
    assert lease.try_acquire()
    plan = make_plan(["h0", "h1", "h2", "h3"], 2)
    return clients, keys, lease, CheckpointStore(clients, keys, plan, chunk_bytes=CHUNK, keep=keep)


def commit(store: CheckpointStore, lease: Lease, algo: DQN) -> str:
    ckpt = f"{lease.epoch}.{algo.updates}"
    store.write(Capturer().capture(algo, {"epoch": lease.epoch}, {}), ckpt, lease.token, 0)
    return ckpt


def same_weights(a: DQN, snap: Snapshot) -> bool:
    fresh = trained(0, seed=5)
    restore(fresh, snap)
    return all(
        torch.equal(x, y) for x, y in zip(fresh.online.parameters(), a.online.parameters(), strict=True)
    )


def test_every_chunk_is_on_two_shards_of_distinct_hosts_and_the_newest_commit_is_recovered(
    shards: Shards,
) -> None:
    clients, keys, lease, store = setup(shards)
    algo = trained(2)
    commit(store, lease, algo)
    algo.update(
        Batch(
            torch.randn(8, 4),
            torch.zeros(8, dtype=torch.long),
            torch.randn(8),
            torch.randn(8, 4),
            torch.ones(8),
        )
    )
    newest = commit(store, lease, algo)
    m = store.manifest(newest)
    assert len(m["sizes"]) > 10
    for i, placed in enumerate(m["placement"]):
        assert len(set(placed)) == 2
        assert all(clients[s].exists(keys.ckpt_chunk(newest, i)) for s in placed)
        assert all(clients[s].ttl(keys.ckpt_chunk(newest, i)) == -1 for s in placed)  # persisted
    loaded = store.recover()
    assert loaded is not None and loaded.ckpt == newest and not loaded.bad_replicas
    assert same_weights(algo, loaded.snapshot)


def test_a_corrupt_replica_is_rejected_and_the_other_replica_is_used(shards: Shards) -> None:
    clients, keys, lease, store = setup(shards)
    algo = trained(3)
    ckpt = commit(store, lease, algo)
    s = store.manifest(ckpt)["placement"][3][0]
    raw = bytearray(clients[s].get(keys.ckpt_chunk(ckpt, 3)))
    raw[100] ^= 0xFF
    clients[s].set(keys.ckpt_chunk(ckpt, 3), bytes(raw))
    loaded = store.recover()
    assert loaded is not None and loaded.ckpt == ckpt
    assert loaded.bad_replicas == [f"{ckpt} chunk 3 on shard {s}: checksum mismatch"]
    assert same_weights(algo, loaded.snapshot)


def test_a_checkpoint_with_every_replica_of_a_chunk_corrupt_is_never_loaded(shards: Shards) -> None:
    clients, keys, lease, store = setup(shards)
    algo = trained(1)
    older = commit(store, lease, algo)
    algo.updates += 1
    newer = commit(store, lease, algo)
    for s in store.manifest(newer)["placement"][2]:
        clients[s].set(keys.ckpt_chunk(newer, 2), b"garbage")
    loaded = store.recover()
    assert loaded is not None and loaded.ckpt == older
    assert loaded.skipped and "chunk 2" in loaded.skipped[0]


def test_chunks_without_a_manifest_are_invisible_and_expire(shards: Shards) -> None:
    clients, keys, lease, store = setup(shards)
    clients[1].set(keys.ckpt_chunk(f"{lease.epoch}.99", 0), b"torn", px=600_000)
    assert store.recover() is None
    with pytest.raises(Incomplete):
        store.load(f"{lease.epoch}.99")


def test_only_the_newest_k_checkpoints_are_kept(shards: Shards) -> None:
    clients, keys, lease, store = setup(shards, keep=2)
    algo = trained(1)
    ids = []
    for _ in range(4):
        algo.updates += 1
        ids.append(commit(store, lease, algo))
    assert store.committed() == [ids[3], ids[2]]
    for c in clients:
        assert not list(c.scan_iter(match=keys.prefix + f"ckpt:{ids[0]}:*"))


def test_a_learner_without_the_lease_cannot_commit(shards: Shards) -> None:
    clients, keys, lease, store = setup(shards)
    clients[0].delete(keys.lease)
    other = Lease(clients[0], keys, learner=1, ttl_s=5.0)
    assert other.try_acquire()
    with pytest.raises(CheckpointFenced):
        commit(store, lease, trained(1))
    assert store.committed() == []


def test_losing_a_shard_restores_from_the_other_replica_and_repair_brings_r_back(shards: Shards) -> None:
    clients, keys, lease, store = setup(shards)
    algo = trained(2)
    ckpt = commit(store, lease, algo)
    shards.kill(2)
    loaded = store.recover()
    assert loaded is not None and loaded.ckpt == ckpt
    assert any("shard 2: unreachable" in b for b in loaded.bad_replicas)
    assert same_weights(algo, loaded.snapshot)
    copies = store.repair(lease.token)
    assert copies > 0
    m = store.manifest(ckpt)
    for i, placed in enumerate(m["placement"]):
        assert 2 not in placed and len(set(placed)) == 2
        assert all(clients[s].exists(keys.ckpt_chunk(ckpt, i)) for s in placed)
    assert store.repair(lease.token) == 0
    # New checkpoints go around the dead shard instead of failing.
    algo.updates += 1
    newer = commit(store, lease, algo)
    assert all(2 not in p and len(p) == 2 for p in store.manifest(newer)["placement"])
