# ruff: noqa: F811  (pytest fixtures imported from test_replay_server are parameters here)
"""Queue tables (fifo sampler, max_times_sampled 1) as Reverb's queue, for on-policy learners:
every unroll an actor inserts reaches the learner exactly once, oldest first, in whole
batches; a full queue holds the actors back instead of dropping what nobody read."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from conftest import wait_for
from test_replay_server import OBS_DIM, TIMEOUT_S, dealer, replay_shard, reply  # noqa: F401

from canopy import wire
from canopy.errors import DeadlineExceeded, ProtocolError
from canopy.replay import protocol
from canopy.replay.insert import InsertClient
from canopy.replay.sample import SampleClient

T = 8  # steps per unroll
QUEUE = "unrolls"


def unrolls(n: int, start: int = 0, inserter: int = 0) -> dict[str, np.ndarray]:
    """n unrolls as an actor sends them; unroll k of inserter j carries the id 1000 j + k
    in every step of `obs` and `action`, and j as its `version`."""
    ids = 1000 * inserter + np.arange(start, start + n)
    steps = np.zeros((n, T), np.float32)
    return {
        "obs": np.broadcast_to(ids[:, None, None], (n, T + 1, OBS_DIM)).astype(np.float32),
        "action": np.repeat(ids[:, None], T, axis=1).astype(np.int64),
        "reward": steps + 1.0,
        "terminated": steps.copy(),
        "truncated": steps.copy(),
        "mask": steps + 1.0,
        "logp": steps - 0.5,
        "version": np.full((n, T), inserter, np.int64),
    }


def queue_shard(replay_shard, capacity: int, **overrides: object):
    return replay_shard(extra_tables=[f"{QUEUE}:fifo:fifo:1:{capacity}"], **overrides)


def ids_of(batch: dict[str, np.ndarray]) -> list[int]:
    assert (batch["action"] == batch["action"][:, :1]).all(), "an unroll's steps were mixed up"
    return batch["action"][:, 0].tolist()


def run_inserter(endpoint: str, inserter: int, items: int, chunk: int, errors: list) -> None:
    """One actor: `items` unrolls in chunks, in order, then waits for every ack."""
    client = InsertClient(endpoint, inflight=2, table=QUEUE, key=inserter)
    try:
        for start in range(0, items, chunk):
            client.insert(unrolls(chunk, start, inserter), timeout=TIMEOUT_S)
        client.flush(timeout=TIMEOUT_S)
    except BaseException as exc:  # recorded: the test fails on it
        errors.append(exc)
    finally:
        client.close()


def test_two_inserters_through_a_small_queue_reach_the_learner_exactly_once_in_order(replay_shard) -> None:
    # 40 unrolls through a queue of 16: the inserters must wait for the learner twice over.
    shard = queue_shard(replay_shard, capacity=16, sample_wait_s=0.5)
    errors: list[BaseException] = []
    threads = [
        threading.Thread(target=run_inserter, args=(shard.endpoint, j, 20, 4, errors), daemon=True)
        for j in (1, 2)
    ]
    for t in threads:
        t.start()
    sampler = SampleClient([shard.endpoint], batch=8, inflight=2, table=QUEUE)
    try:
        batches = [sampler.next(timeout=TIMEOUT_S) for _ in range(5)]
    finally:
        sampler.close()
        for t in threads:
            t.join(timeout=TIMEOUT_S)
    assert not any(t.is_alive() for t in threads), "an inserter hung"
    assert not errors, errors
    assert all(b["obs"].shape == (8, T + 1, OBS_DIM) and b["logp"].shape == (8, T) for b in batches)
    seen = [i for b in batches for i in ids_of(b)]
    expected = [1000 * j + k for j in (1, 2) for k in range(20)]
    assert sorted(seen) == expected  # every unroll once: none lost, none twice
    for j in (1, 2):
        assert [i for i in seen if i // 1000 == j] == [1000 * j + k for k in range(20)]
    for b in batches:
        np.testing.assert_array_equal(b["version"][:, 0], np.asarray(ids_of(b)) // 1000)
    stats = shard.stats()
    assert stats[f"{QUEUE}_items"] == 0 and stats[f"{QUEUE}_removed_total"] == 40
    assert stats[f"{QUEUE}_inserted_total"] == 40 and stats["main_items"] == 0


def test_a_full_queue_parks_inserts_until_a_sample_makes_room(replay_shard) -> None:
    shard = queue_shard(replay_shard, capacity=16)
    inserter = InsertClient(shard.endpoint, inflight=8, table=QUEUE)
    sampler = None
    try:
        for start in range(0, 24, 4):  # six chunks of four: only four fit
            inserter.insert(unrolls(4, start), timeout=TIMEOUT_S)
        wait_for(
            lambda: (s := shard.stats())[f"{QUEUE}_items"] == 16 and s["parked"] == 2,
            TIMEOUT_S,
            what="16 unrolls stored and two chunks parked",
        )
        with pytest.raises(DeadlineExceeded):
            inserter.flush(timeout=0.5)
        assert inserter.inflight == 2  # exactly four chunks (16 unrolls) acknowledged
        stats = shard.stats()
        assert stats[f"{QUEUE}_removed_total"] == 0, "the full queue evicted an unread unroll"

        sampler = SampleClient([shard.endpoint], batch=8, inflight=1, table=QUEUE)
        assert ids_of(sampler.next(timeout=TIMEOUT_S)) == list(range(8))
        inserter.flush(timeout=TIMEOUT_S)  # both parked chunks are acknowledged now
        assert inserter.inflight == 0 and inserter.errors_total == 0
        # The next batches continue where the first left off: nothing skipped.
        assert ids_of(sampler.next(timeout=TIMEOUT_S)) == list(range(8, 16))
        assert ids_of(sampler.next(timeout=TIMEOUT_S)) == list(range(16, 24))
    finally:
        inserter.close()
        if sampler is not None:
            sampler.close()
    stats = shard.stats()
    assert stats[f"{QUEUE}_inserted_total"] == 24 and stats[f"{QUEUE}_removed_total"] == 24


def test_a_sample_is_served_only_as_a_whole_batch(replay_shard, dealer) -> None:
    shard = queue_shard(replay_shard, capacity=16, sample_wait_s=0.3)
    sock = dealer(shard.endpoint)
    sock.send_multipart(wire.encode(protocol.insert_request(1, 5, QUEUE), unrolls(5)))
    assert reply(sock, shard).op == "ack"
    sock.send_multipart(wire.encode(protocol.sample_request(8, 2, table=QUEUE, packed=False)))
    held = reply(sock, shard)
    assert (held.op, held.header["code"], held.header["req"]) == ("error", "not_ready", 2)
    assert shard.stats()[f"{QUEUE}_items"] == 5  # nothing was taken by the refused sample

    sock.send_multipart(wire.encode(protocol.insert_request(3, 3, QUEUE), unrolls(3, start=5)))
    assert reply(sock, shard).op == "ack"
    sock.send_multipart(wire.encode(protocol.sample_request(8, 4, table=QUEUE, packed=False)))
    batch = reply(sock, shard)
    assert batch.op == "batch" and batch.arrays["action"][:, 0].tolist() == list(range(8))
    assert shard.stats()[f"{QUEUE}_items"] == 0


def test_a_chunk_or_a_batch_larger_than_the_queue_is_refused_at_once(replay_shard, dealer) -> None:
    shard = queue_shard(replay_shard, capacity=16)
    client = InsertClient(shard.endpoint, inflight=1, table=QUEUE)
    try:
        client.insert(unrolls(17), timeout=TIMEOUT_S)
        with pytest.raises(ProtocolError, match="holds 16 items, this chunk has 17") as refused:
            client.flush(timeout=TIMEOUT_S)
    finally:
        client.close()
    message = str(refused.value)
    assert "extra_tables" in message and "\n" not in message
    sock = dealer(shard.endpoint)
    sock.send_multipart(wire.encode(protocol.sample_request(32, 7, table=QUEUE, packed=False)))
    msg = reply(sock, shard)
    assert msg.header["code"] == "bad_request" and "batch of 32" in msg.header["message"]
    stats = shard.stats()
    assert stats["rejected_total"] == 2 and stats[f"{QUEUE}_items"] == 0 and stats["parked"] == 0
    assert shard.alive(), f"server died: {shard.errors!r}"


def test_a_queue_ignores_the_global_rate_limiter_and_refuses_a_new_one(replay_shard, dealer) -> None:
    # Tuned for the main table, these would never let a 16-unroll queue serve (min_size 500).
    shard = queue_shard(replay_shard, capacity=16, min_size=500, samples_per_insert=8.0, error_buffer=100.0)
    sock = dealer(shard.endpoint)
    sock.send_multipart(wire.encode(protocol.insert_request(1, 8, QUEUE), unrolls(8)))
    assert reply(sock, shard).op == "ack"
    sock.send_multipart(wire.encode(protocol.sample_request(8, 2, table=QUEUE, packed=False)))
    assert reply(sock, shard).op == "batch"
    sock.send_multipart(wire.encode(protocol.configure_request(3, table=QUEUE, min_size=100)))
    msg = reply(sock, shard)
    assert msg.header["code"] == "bad_request" and "queue" in msg.header["message"]
    stats = shard.stats()
    assert stats[f"{QUEUE}_min_size"] == 1 and stats[f"{QUEUE}_samples_per_insert"] == 0
    assert stats["main_min_size"] == 500 and stats["main_samples_per_insert"] == 8.0
