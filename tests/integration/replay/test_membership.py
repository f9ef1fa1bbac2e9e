"""Replay membership with real processes: `canopy replay` shards, a real redis-server, ZeroMQ.

Shards are killed with SIGKILL and started mid-test; actors' InsertClients must follow
within seconds and a learner's SampleClient must keep its global probabilities right.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from conftest import REPO_ROOT, RedisServer, free_port, stop_process, wait_for

from canopy import config as config_mod
from canopy.keys import Keys
from canopy.replay.connect import request_stats
from canopy.replay.insert import InsertClient
from canopy.replay.membership import RedisMembers, join, shard_for
from canopy.replay.sample import SampleClient

TTL_S = 0.6
POLL_S = TTL_S / 3
MOVE_WITHIN_S = 5.0  # TTL + a poll + process scheduling on a busy 2-core machine
TIMEOUT_S = 15.0


def transitions(n: int, start: int = 0) -> dict[str, np.ndarray]:
    ids = np.arange(start, start + n)
    return {
        "obs": np.repeat(ids[:, None], 4, axis=1).astype(np.float32),
        "action": (ids % 2).astype(np.int64),
        "reward": np.ones(n, np.float32),
        "next_obs": np.repeat(ids[:, None] + 1, 4, axis=1).astype(np.float32),
        "discount": np.full(n, 0.99, np.float32),
        "version": np.zeros(n, np.int64),
    }


class ShardProcs:
    """`canopy replay --id N` processes of one run; every one is stopped at teardown."""

    def __init__(self, cfg_path: Path, endpoints: list[str], log_dir: Path):
        self.cfg_path, self.endpoints, self.log_dir = cfg_path, endpoints, log_dir
        self.procs: dict[int, subprocess.Popen] = {}

    def start(self, ident: int) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        env.pop("CANOPY_PARENT_PID", None)
        cmd = [sys.executable, "-m", "canopy.cluster.cli", "replay", "--config", str(self.cfg_path)]
        cmd += ["--id", str(ident)]
        with open(self.log_dir / f"replay-{ident}.log", "wb") as log:
            self.procs[ident] = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT
            )

    def kill(self, ident: int) -> None:
        self.procs[ident].send_signal(signal.SIGKILL)
        self.procs[ident].wait(timeout=10)

    def log(self, ident: int) -> str:
        return (self.log_dir / f"replay-{ident}.log").read_text(errors="replace")[-2000:]

    def stop(self) -> None:
        for p in self.procs.values():
            stop_process(p, timeout=5)


@pytest.fixture
def members(redis_client: redis.Redis, run_keys: Keys) -> Iterator[RedisMembers]:
    m = RedisMembers(redis_client, run_keys, POLL_S)
    try:
        yield m
    finally:
        m.close()


@pytest.fixture
def shard_procs(redis_server: RedisServer, run_keys: Keys, tmp_path: Path) -> Iterator[ShardProcs]:
    cfg = config_mod.Config()
    cfg.run.name = run_keys.run
    cfg.cluster = redis_server.cluster_config()
    cfg.cluster.replay = [f"tcp://127.0.0.1:{free_port()}" for _ in range(3)]
    cfg.replay.min_size = 1
    cfg.replay.samples_per_insert = 0.0
    cfg.replay.sampler = "prioritized"
    cfg.replay.priority_exponent = 1.0
    cfg.replay.member_ttl_s = TTL_S
    path = tmp_path / "config.toml"
    config_mod.save(cfg, path)
    procs = ShardProcs(path, cfg.cluster.replay, tmp_path)
    try:
        yield procs
    finally:
        procs.stop()


def started(procs: ShardProcs, members: RedisMembers, *idents: int) -> None:
    for i in idents:
        procs.start(i)
    for i in idents:
        wait_for(
            lambda i=i: members.view[1].get(i) == procs.endpoints[i] or procs.procs[i].poll() is not None,
            TIMEOUT_S,
            what=f"replay shard {i} in membership",
        )
        assert procs.procs[i].poll() is None, procs.log(i)


def redis_now(r: redis.Redis) -> float:
    seconds, micros = r.time()
    return seconds + micros / 1e6


def insert(endpoint: str, arrays: dict[str, np.ndarray]) -> None:
    client = InsertClient(endpoint, inflight=1)
    try:
        client.insert(arrays, timeout=TIMEOUT_S)
        client.flush(timeout=TIMEOUT_S)
    finally:
        client.close()


def test_a_shard_is_live_until_it_stops_and_then_listed_with_the_dead(
    redis_client: redis.Redis, run_keys: Keys, members: RedisMembers
) -> None:
    stop = threading.Event()
    join(redis_client, run_keys, 4, "tcp://127.0.0.1:5999", ttl_s=TTL_S, stop=stop)
    generation = wait_for(
        lambda: members.view[1] == {4: "tcp://127.0.0.1:5999"} and members.view[0], TIMEOUT_S
    )
    first_deadline = redis_client.zscore(run_keys.replay_members, "4")
    # Past its first deadline the shard is still live: the heartbeat moved the deadline on.
    wait_for(lambda: redis_now(redis_client) > first_deadline + POLL_S, TIMEOUT_S)
    members.poll()
    assert members.view == (generation, {4: "tcp://127.0.0.1:5999"})
    stop.set()
    wait_for(lambda: members.view[1] == {}, TIMEOUT_S, what="the shard to leave")
    now = redis_client.time()[0]
    assert redis_client.zrangebyscore(run_keys.replay_members, "-inf", now) == [b"4"]


def test_configured_endpoints_serve_until_any_shard_registers(
    redis_client: redis.Redis, run_keys: Keys
) -> None:
    m = RedisMembers(redis_client, run_keys, POLL_S, fallback=["tcp://127.0.0.1:1", "tcp://127.0.0.1:2"])
    try:
        assert m.view[1] == {0: "tcp://127.0.0.1:1", 1: "tcp://127.0.0.1:2"}
        stop = threading.Event()
        join(redis_client, run_keys, 1, "tcp://127.0.0.1:2", ttl_s=TTL_S, stop=stop)
        wait_for(lambda: m.view[1] == {1: "tcp://127.0.0.1:2"}, TIMEOUT_S, what="Redis to take over")
        stop.set()
    finally:
        m.close()


def test_bad_member_entries_are_skipped_and_counted(redis_client: redis.Redis, run_keys: Keys) -> None:
    far = redis_client.time()[0] + 3600
    redis_client.zadd(run_keys.replay_members, {"0": far, "1": far, "nan": far, "2": far})
    redis_client.hset(
        run_keys.replay_endpoints,
        mapping={"0": "tcp://127.0.0.1:7000", "1": "javascript:alert(1)", "nan": "tcp://127.0.0.1:7001"},
    )
    m = RedisMembers(redis_client, run_keys, POLL_S)
    try:
        assert m.view[1] == {0: "tcp://127.0.0.1:7000"}
        assert m.rejected_total == 3  # bad endpoint, bad id, no endpoint at all
    finally:
        m.close()


@pytest.mark.fault
def test_an_actor_moves_to_the_survivor_within_seconds_of_a_kill_9(
    shard_procs: ShardProcs, members: RedisMembers
) -> None:
    started(shard_procs, members, 0, 1)
    key = next(k for k in range(100) if shard_for(k, {0, 1}) == 1)
    client = InsertClient(members, inflight=2, key=key)
    try:
        assert client.shard == 1
        client.insert(transitions(16), timeout=TIMEOUT_S)
        client.flush(timeout=TIMEOUT_S)
        shard_procs.kill(1)
        t_kill = time.monotonic()
        while client.shard != 0:  # keeps inserting, as an actor does; blocks once 2 are unacked
            assert time.monotonic() - t_kill < MOVE_WITHIN_S, "the client did not leave the dead shard"
            client.insert(transitions(16), timeout=MOVE_WITHIN_S)
        moved_s = time.monotonic() - t_kill
        client.insert(transitions(16, start=100), timeout=TIMEOUT_S)
        client.flush(timeout=TIMEOUT_S)
    finally:
        client.close()
    assert moved_s < MOVE_WITHIN_S
    assert client.moves_total == 1 and client.chunks_dropped_total <= 2
    assert request_stats(shard_procs.endpoints[0], timeout=TIMEOUT_S)["inserts_total"] >= 16


@pytest.mark.fault
def test_sampling_goes_on_across_a_kill_9_with_the_survivors_probabilities(
    shard_procs: ShardProcs, members: RedisMembers
) -> None:
    # Shard 0: four items of priority 1; shard 1: two of priority 4 and 8 (alpha 1).
    started(shard_procs, members, 0, 1)
    insert(shard_procs.endpoints[0], {**transitions(4), "priority": np.ones(4)})
    insert(shard_procs.endpoints[1], {**transitions(2, start=100), "priority": np.array([4.0, 8.0])})
    sampler = SampleClient(members, batch=16, inflight=2, is_exponent=1.0, is_exponent_final=1.0)
    batches = []
    try:
        batches += [sampler.next(timeout=TIMEOUT_S) for _ in range(40)]
        shard_procs.kill(1)
        t_kill = time.monotonic()
        while sampler.shards.keys() != {0} or len(batches) < 80:
            assert time.monotonic() - t_kill < MOVE_WITHIN_S + TIMEOUT_S, "sampling stalled after the kill"
            batches.append(sampler.next(timeout=MOVE_WITHIN_S))
    finally:
        sampler.close()
    priority = {0: 1, 1: 1, 2: 1, 3: 1, 100: 4, 101: 8}
    mass = {6: 16.0, 4: 4.0}  # global size -> total priority of the shards drawn from
    seen = set()
    for b in batches:
        n = int(b["global_size"])
        seen.add(n)
        p = np.array([priority[i] for i in b["obs"][:, 0].astype(int)]) / mass[n]
        np.testing.assert_allclose(b["prob"], p)
        # beta 1: weights normalised by the largest one, that of the least likely item drawn from.
        np.testing.assert_allclose(b["weight"], (1 / mass[n]) / p, rtol=1e-6)
    assert seen == {6, 4}
    assert int(batches[-1]["global_size"]) == 4 and set(batches[-1]["shard"]) == {0}


@pytest.mark.fault
def test_a_joining_shard_takes_only_its_rendezvous_share_of_actors_and_enters_the_draw(
    shard_procs: ShardProcs, members: RedisMembers
) -> None:
    started(shard_procs, members, 0, 1)
    clients = {k: InsertClient(members, inflight=2, key=k) for k in range(60)}
    sampler = SampleClient(members, batch=8, inflight=2, is_exponent=1.0, is_exponent_final=1.0)
    try:
        for k, c in clients.items():
            c.insert({**transitions(1, start=k), "priority": np.ones(1)}, timeout=TIMEOUT_S)
        before = {k: c.shard for k, c in clients.items()}
        sampler.next(timeout=TIMEOUT_S)
        started(shard_procs, members, 2)
        expected = {k for k in clients if shard_for(k, {0, 1, 2}) == 2}

        def moved() -> bool:
            for k, c in clients.items():
                c.insert({**transitions(1, start=k), "priority": np.ones(1)}, timeout=TIMEOUT_S)
            return all(clients[k].shard == 2 for k in expected)

        wait_for(moved, MOVE_WITHIN_S, interval=0.1, what="the new shard's actors to move")
        assert {k for k, c in clients.items() if c.shard != before[k]} == expected
        assert all(c.moves_total == (k in expected) for k, c in clients.items())
        assert 0.15 < len(expected) / len(clients) < 0.55  # about 1/3; 60 actors are few
        for c in clients.values():
            c.flush(timeout=TIMEOUT_S)
        assert sum(c.chunks_dropped_total for c in clients.values()) == 0  # old shards acked theirs
        # The learner takes the new shard into its draw; probabilities cover all three.
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            b = sampler.next(timeout=TIMEOUT_S)
            if 2 in b["shard"]:
                break
            assert time.monotonic() < deadline, "the new shard never entered the draw"
        assert int(b["global_size"]) > sum(b["shard"] == 2)  # items of the other shards count too
        np.testing.assert_allclose(b["prob"], 1 / int(b["global_size"]))  # every priority is 1
    finally:
        sampler.close()
        for c in clients.values():
            c.close()
