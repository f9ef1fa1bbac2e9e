"""learner/checkpoint/prefetch.py against real redis-server shards: a standby's warm checkpoint."""

from __future__ import annotations

import torch
from conftest import wait_for
from redis_shards import Shards, shards_fixture

from canopy.config import LearnerConfig
from canopy.keys import Keys
from canopy.learner.algorithms.dqn import DQN
from canopy.learner.checkpoint.placement import make_plan
from canopy.learner.checkpoint.prefetch import Prefetcher
from canopy.learner.checkpoint.state import Capturer
from canopy.learner.checkpoint.store import CheckpointStore
from canopy.learner.network import QNetwork
from canopy.lease import Lease

shards = shards_fixture(3)


def test_the_prefetcher_follows_new_commits_and_hands_over_only_the_newest(shards: Shards) -> None:
    clients = shards.clients()
    keys = Keys("prefetch")
    lease = Lease(clients[0], keys, learner=0, ttl_s=60.0)
    assert lease.try_acquire()
    store = CheckpointStore(clients, keys, make_plan(["h0", "h1", "h2"], 2), chunk_bytes=4096)
    torch.manual_seed(0)
    algo = DQN(QNetwork(4, 2, [32, 32]), LearnerConfig())

    def commit() -> str:
        algo.updates += 1
        ckpt = f"{lease.epoch}.{algo.updates}"
        store.write(Capturer().capture(algo, {}, {}), ckpt, lease.token, 0)
        return ckpt

    a = commit()
    pre = Prefetcher(store, poll_s=0.02)
    try:
        wait_for(lambda: pre.loaded is not None and pre.loaded.ckpt == a, 10, 0.01, "prefetch of a")
        b = commit()
        wait_for(lambda: pre.loaded.ckpt == b, 10, 0.01, "prefetch of b")
    finally:
        taken = pre.take()
    assert taken is not None and taken.ckpt == b and not taken.bad_replicas

    # A commit after the last poll: the prefetched state is stale and is not handed over.
    slow = Prefetcher(store, poll_s=60.0)
    try:
        wait_for(lambda: slow.loaded is not None, 10, 0.01, "first prefetch")
        commit()
    finally:
        assert slow.take() is None
