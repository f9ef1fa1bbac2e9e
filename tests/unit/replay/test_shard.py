"""replay/shard.py: queue tables get their own limiter (in `build` and `load`) and admit
inserts and samples by their capacity and size alone."""

from __future__ import annotations

import numpy as np
import pytest

from canopy.config import ReplayConfig
from canopy.errors import ProtocolError
from canopy.replay import shard
from canopy.replay.protocol import SampleRequest

# Limits tuned for an off-policy main table: never right for a 16-unroll queue.
CFG = dict(capacity=100, min_size=50, samples_per_insert=4.0, error_buffer=20.0)


def build(**overrides: object) -> dict[str, shard.Slot]:
    return shard.build(ReplayConfig(**{**CFG, "extra_tables": ["q:fifo:fifo:1:16"], **overrides}), seed=0)


def items(n: int, start: int = 0) -> dict[str, np.ndarray]:
    return {"obs": np.arange(start, start + n, dtype=np.float32)[:, None].repeat(2, axis=1)}


def test_a_queue_gets_the_queue_limiter_and_the_main_table_the_global_one() -> None:
    slots = build()
    assert slots["q"].limiter.settings() == shard.QUEUE_LIMITER
    assert slots["main"].limiter.settings() == {
        "samples_per_insert": 4.0,
        "min_size": 50,
        "error_buffer": 20.0,
    }


def test_a_queue_admits_inserts_by_room_and_serves_only_whole_batches() -> None:
    q = build()["q"]
    assert q.admits(16) and not q.admits(17)
    q.table.insert(items(12))
    assert q.admits(4) and not q.admits(5)
    assert q.serves(12) and not q.serves(13)
    assert q.most_batches(SampleRequest(4, 5, False, False)) == 3  # 12 items: three whole batches
    with pytest.raises(ProtocolError, match="batch of 17 could never be served"):
        q.check_batch(17)
    q.check_batch(16)


def test_a_ring_table_keeps_its_limiter_and_its_eviction() -> None:
    main = build(min_size=1, samples_per_insert=0.0)["main"]
    main.table.insert(items(100))
    assert main.admits(1000)
    assert main.serves(1000)  # a ring draws with replacement
    main.check_batch(1000)  # no refusal: only queues have an item bound on a batch
    assert main.most_batches(SampleRequest(4, 5, False, False)) == 5


def test_a_snapshot_loads_a_queue_with_the_queue_limiter_whatever_it_saved() -> None:
    slots = build()
    slots["q"].table.insert(items(6))
    slots["q"].limiter.inserted = 6
    state, groups = shard.export(slots)
    # An older shard saved the global settings for its queue too.
    state["limiters"]["q"].update(samples_per_insert=4.0, min_size=50, error_buffer=20.0)
    loaded = shard.load(ReplayConfig(**{**CFG, "extra_tables": ["q:fifo:fifo:1:16"]}), 0, state, groups)
    assert loaded["q"].limiter.settings() == shard.QUEUE_LIMITER
    assert loaded["q"].limiter.inserted == 6 and loaded["q"].table.size == 6
    assert loaded["main"].limiter.settings()["min_size"] == 50


def test_the_epoch_fence_admits_the_newest_epoch_and_its_peers_and_survives_a_snapshot() -> None:
    fence = shard.EpochFence()
    assert fence.admit(1) and fence.admit(2) and fence.admit(2)  # a group's ranks share epoch 2
    assert not fence.admit(1)
    state, _ = shard.export(shard.build(ReplayConfig(**CFG), 0), fence)
    assert shard.fence_from(state).newest == 2
    assert shard.fence_from({"tables": {}}).newest == 0  # a snapshot from before fencing
    with pytest.raises(ValueError, match="priority_epoch"):
        shard.fence_from({**state, "priority_epoch": "2"})
