# ruff: noqa: F811  (pytest fixtures imported from test_replay_server are parameters here)
"""Several tables per shard, priority updates by (shard, slot, gen), runtime limiter changes,
and importance weights that stay unbiased when the learner samples across shards."""

from __future__ import annotations

import numpy as np
import pytest
from test_replay_server import TIMEOUT_S, dealer, replay_shard, reply, transitions  # noqa: F401

from canopy import wire
from canopy.replay import protocol
from canopy.replay.insert import InsertClient
from canopy.replay.sample import SampleClient


def insert(endpoint: str, arrays: dict, table: str | None = None) -> None:
    client = InsertClient(endpoint, inflight=1, table=table)
    try:
        client.insert(arrays, timeout=TIMEOUT_S)
        client.flush(timeout=TIMEOUT_S)
    finally:
        client.close()


def test_a_shard_serves_several_tables_each_with_its_own_selector(replay_shard) -> None:
    shard = replay_shard(extra_tables=["queue:fifo:fifo:1:100"])
    insert(shard.endpoint, transitions(10))
    insert(shard.endpoint, transitions(3, start=500), table="queue")
    queue = SampleClient([shard.endpoint], batch=1, inflight=1, table="queue")
    try:
        drawn = [int(queue.next(timeout=TIMEOUT_S)["obs"][0, 0]) for _ in range(3)]
    finally:
        queue.close()
    assert drawn == [500, 501, 502]  # fifo, each item once
    stats = shard.stats()
    assert stats["main_items"] == 10 and stats["queue_items"] == 0
    assert stats["queue_sampler"] == "fifo" and stats["tables"] == "main,queue"


def test_a_request_for_an_unknown_table_is_refused_and_names_the_tables(replay_shard, dealer) -> None:
    shard = replay_shard()
    sock = dealer(shard.endpoint)
    sock.send_multipart(wire.encode({"op": "sample", "batch": 4, "req": 5, "table": "nope"}))
    msg = reply(sock, shard)
    assert msg.header["code"] == "bad_request" and "main" in msg.header["message"]
    assert shard.stats()["rejected_total"] == 1


def test_a_priority_update_from_the_learner_changes_what_is_sampled(replay_shard) -> None:
    shard = replay_shard(sampler="prioritized", capacity=16, priority_exponent=1.0)
    insert(shard.endpoint, transitions(16))
    sampler = SampleClient([shard.endpoint], batch=256, inflight=1)
    try:
        batch = sampler.next(timeout=TIMEOUT_S)
        ids = batch["obs"][:, 0].astype(int)
        assert set(ids.tolist()) == set(range(16))  # equal priorities: every item shows up
        # Item 3 gets almost all the priority mass.
        sampler.update_priorities(0, batch["slot"], batch["gen"], np.where(ids == 3, 1e6, 1e-6))
        sampler.next(timeout=TIMEOUT_S)  # requested before the update went out
        draws = sampler.next(timeout=TIMEOUT_S)["obs"][:, 0]
    finally:
        sampler.close()
    assert np.mean(draws == 3) > 0.95
    stats = shard.stats()
    assert stats["priority_updates_total"] == 256 and stats["priority_updates_dropped_total"] == 0
    assert stats["main_priority_max"] == 1e6


def test_a_stale_generation_never_changes_the_new_item_in_that_slot(replay_shard) -> None:
    shard = replay_shard(sampler="prioritized", capacity=4, priority_exponent=1.0)
    insert(shard.endpoint, {**transitions(4), "priority": np.ones(4)})
    sampler = SampleClient([shard.endpoint], batch=64, inflight=1)
    try:
        old = sampler.next(timeout=TIMEOUT_S)
        insert(shard.endpoint, {**transitions(4, start=10), "priority": np.ones(4)})  # all replaced
        sampler.update_priorities(0, old["slot"], old["gen"], np.full(64, 1e6))
        sampler.next(timeout=TIMEOUT_S)  # requested before the second insert
        fresh = [sampler.next(timeout=TIMEOUT_S) for _ in range(5)]
    finally:
        sampler.close()
    counts = np.bincount(np.concatenate([b["obs"][:, 0] for b in fresh]).astype(int) - 10, minlength=4)
    assert counts.min() > 0.1 * counts.sum() / 4, f"a stale update skewed sampling: {counts}"
    assert shard.stats()["priority_updates_dropped_total"] == 64


def test_the_rate_limiter_changes_at_runtime_without_a_restart(replay_shard, dealer) -> None:
    shard = replay_shard(min_size=100, sample_wait_s=30.0)
    insert(shard.endpoint, transitions(10))
    sock = dealer(shard.endpoint)
    sock.send_multipart(wire.encode({"op": "sample", "batch": 4, "req": 1}))
    assert not sock.poll(200), "a sample below min_size was served"
    sock.send_multipart(wire.encode(protocol.configure_request(req=2, min_size=5)))
    replies = {m.header["req"]: m for m in (reply(sock, shard), reply(sock, shard))}
    assert replies[2].op == protocol.Reply.CONFIGURED and replies[2].header["limiter"]["min_size"] == 5
    assert replies[1].op == protocol.Reply.BATCH  # the parked sample went out once the limiter loosened
    assert shard.stats()["main_min_size"] == 5


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_importance_weights_are_unbiased_across_shards_with_different_priority_mass(
    replay_shard, beta: float
) -> None:
    # Shard 0: four items of priority 1; shard 1: two items of priority 4 and 8 (alpha 1).
    # Global P = p / 16 and N = 6, whatever shard an item lives on.
    shards = [replay_shard(sampler="prioritized", priority_exponent=1.0) for _ in range(2)]
    insert(shards[0].endpoint, {**transitions(4), "priority": np.ones(4)})
    insert(shards[1].endpoint, {**transitions(2, start=100), "priority": np.array([4.0, 8.0])})
    sampler = SampleClient(
        [s.endpoint for s in shards], batch=32, inflight=2, is_exponent=beta, is_exponent_final=beta, seed=1
    )
    try:
        batches = [sampler.next(timeout=TIMEOUT_S) for _ in range(600)]
    finally:
        sampler.close()
    ids = np.concatenate([b["obs"][:, 0] for b in batches]).astype(int)
    prob = np.concatenate([b["prob"] for b in batches])
    weight = np.concatenate([b["weight"] for b in batches])
    assert all(int(b["global_size"]) == 6 for b in batches)
    p_true = {0: 1, 1: 1, 2: 1, 3: 1, 100: 4, 101: 8}
    np.testing.assert_allclose(prob, [p_true[i] / 16 for i in ids])
    # Normalised by the largest weight anywhere: the priority-1 items on shard 0.
    np.testing.assert_allclose(weight, [(1 / p_true[i]) ** beta for i in ids], rtol=1e-6)
    # Each item is drawn with its global probability ...
    freq = {i: np.mean(ids == i) for i in p_true}
    for i, p in p_true.items():
        assert abs(freq[i] - p / 16) < 0.03, (i, freq[i], p / 16)
    # ... so with beta 1 the weighted estimate of a uniform mean is unbiased.
    if beta == 1.0:
        f = ids.astype(float)
        estimate = np.mean(f / (6 * prob))
        assert abs(estimate - np.mean(list(p_true))) < 0.1 * np.mean(list(p_true))
