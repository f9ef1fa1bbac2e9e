"""The publish-to-actor path the broadcast bench measures: notification topics (actors are
never woken for a version still arriving), one HostWatch per process handing landed
versions to many ClientCores, catch-up from each core's own beats when the watch missed
one, multi-chunk Redis fetches over several connections in order, the node's stage times,
and a corrupt chunk never reaching the host's ring."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import numpy as np
import pytest
import redis
import zmq
from conftest import RedisServer, mlp_weights, wait_for

from canopy.cache import blob, protocol
from canopy.cache.client import ClientCore, HostWatch
from canopy.cache.node import CacheNode
from canopy.cache.upstream import Parent
from canopy.config import CacheConfig
from canopy.errors import ProtocolError
from canopy.keys import Keys
from canopy.redisconn import connect
from canopy.version import Version

TIMEOUT_S = 10.0
FAST = {"poll_s": 0.1, "heartbeat_s": 0.1, "parent_timeout_s": 0.6, "keep_versions": 3}


def publish(r: redis.Redis, keys: Keys, state: dict, version: Version) -> tuple[blob.Manifest, list]:
    manifest, chunks = blob.pack(state, version, "mlp", 0)
    blob.write(r, keys, manifest, chunks)
    return manifest, chunks


@pytest.fixture
def node_factory(redis_server: RedisServer, run_keys: Keys) -> Iterator:
    stops: list[tuple[threading.Event, threading.Thread, redis.Redis]] = []

    def make(shm_tag: str = "", **cfg) -> tuple[CacheNode, Parent]:
        r = connect(redis_server.cluster_config(), "cache", len(stops))
        node = CacheNode(CacheConfig(**{**FAST, **cfg}), r, run_keys, name="leaf", shm_tag=shm_tag)
        fetch, notify = node.bind("tcp://127.0.0.1:0", "tcp://127.0.0.1:0")
        stop = threading.Event()
        thread = threading.Thread(target=node.serve, args=(stop,), daemon=True)
        thread.start()
        stops.append((stop, thread, r))
        return node, Parent(fetch, notify)

    try:
        yield make
    finally:
        for stop, thread, r in stops:
            stop.set()
            thread.join(timeout=5)
            r.close()


class Cores:
    """ClientCores of one simulated actor process, pumped by hand like the bench does."""

    def __init__(self, ep: Parent, n: int, watch: bool = True):
        self.ctx = zmq.Context.instance()
        self.watch = HostWatch(ep.notify, self.ctx) if watch else None
        self.cores = [
            ClientCore(
                [(ep.fetch, ep.notify)], self.ctx, parent_timeout_s=5.0, heartbeat_s=0.1, watch=self.watch
            )
            for _ in range(n)
        ]
        for c in self.cores:
            if self.watch is not None:
                self.watch.add(c)
            c.connect()
        self.current: list[Version | None] = [None] * n
        self.updates: list = [None] * n

    def pump(self, use_watch: bool = True) -> None:
        if self.watch is not None and self.watch.sub.poll(0):
            if use_watch:
                for core, update in self.watch.on_readable():
                    self._took(self.cores.index(core), update)
            else:  # the watch missed these: drop them unread
                while self.watch.sub.poll(0):
                    self.watch.sub.recv_multipart()
        for i, c in enumerate(self.cores):
            for s in c.sockets():
                while s.poll(0):
                    update = c.on_readable(s)
                    if update is not None:
                        self._took(i, update)
            c.tick()

    def _took(self, i: int, update) -> None:
        self.cores[i].acting(update.version)
        self.current[i], self.updates[i] = update.version, update

    def wait(self, what, timeout: float = TIMEOUT_S, use_watch: bool = True) -> None:
        def done() -> bool:
            self.pump(use_watch)
            return what()

        wait_for(done, timeout, what="the simulated actors")

    def close(self) -> None:
        for c in self.cores:
            c.close()
        if self.watch is not None:
            self.watch.close()


def test_actors_subscribe_to_landed_versions_and_beats_but_never_to_arrivals() -> None:
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind("tcp://127.0.0.1:0")
    ep = pub.getsockopt_string(zmq.LAST_ENDPOINT)
    core = ClientCore([("tcp://127.0.0.1:1", ep)], ctx)
    core.connect()
    sub = core.sockets()[0]
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not sub.poll(50):  # PUB/SUB has no handshake: beat until the SUB hears one
            assert time.monotonic() < deadline
            pub.send_multipart(protocol.notify("", 0, "n", ""))
        while sub.poll(50):
            protocol.recv_notify(sub)
        pub.send_multipart(protocol.notify("1.1", 0, "n", "", arriving="1.2"))
        pub.send_multipart(protocol.notify("1.2", 1, "n", "", topic=protocol.TOPIC_LANDED))
        assert sub.poll(int(TIMEOUT_S * 1000))
        frames = sub.recv_multipart()
        assert frames[0] == protocol.TOPIC_LANDED  # the arrival was filtered out at the PUB
        # A notification without a known topic frame is refused, and the core counts it.
        pub.send_multipart(protocol.notify("1.2", 1, "n", "", topic=protocol.TOPIC_BEAT)[1:])
        pub.send_multipart([b"b", b"\xc1garbage"])
        deadline = time.monotonic() + TIMEOUT_S
        while core.rejected_total < 1:
            assert time.monotonic() < deadline
            if sub.poll(50):
                core.on_readable(sub)
    finally:
        core.close()
        pub.close(0)
    with pytest.raises(ProtocolError):
        s = ctx.socket(zmq.PAIR)
        r = ctx.socket(zmq.PAIR)
        try:
            s.bind("inproc://notify-topic-test")
            r.connect("inproc://notify-topic-test")
            s.send_multipart([b"x", *protocol.notify("1.1", 0, "n", "")[1:]])
            r.poll(1000)
            protocol.recv_notify(r)
        finally:
            s.close(0)
            r.close(0)


def test_one_watch_per_process_hands_the_landed_version_to_every_actor_on_the_shared_copy(
    redis_client: redis.Redis, run_keys: Keys, node_factory
) -> None:
    node, ep = node_factory(shm_tag=f"t-{uuid.uuid4().hex[:8]}")
    cores = Cores(ep, 6)
    try:
        cores.wait(lambda: all(c.attached for c in cores.cores))
        state = mlp_weights(1, rows=300_000)  # several chunks: written into the ring as they arrive
        manifest, _ = publish(redis_client, run_keys, state, Version(1, 1))
        assert manifest.chunks >= 3
        cores.wait(lambda: all(v == manifest.version for v in cores.current))
        assert all(u.shared for u in cores.updates)
        assert cores.updates[0].arrays is cores.updates[-1].arrays  # one set of views per process
        np.testing.assert_array_equal(cores.updates[2].arrays["layers.0.weight"], state["layers.0.weight"])
        assert node.counters["served_bytes_total"] == 0  # only notifications crossed sockets
        assert all(c.missed_notifications_total == 0 for c in cores.cores)
        # The node's way through each stage, in order, for the bench's breakdown.
        stages = node.counters["stages"]
        assert stages["version"] == str(manifest.version)
        times = [stages[k] for k in ("heard", "begun", "fetched", "stored", "announced")]
        assert times == sorted(times)
    finally:
        cores.close()


def test_a_landed_version_the_watch_missed_reaches_every_actor_from_its_own_beats(
    redis_client: redis.Redis, run_keys: Keys, node_factory
) -> None:
    node, ep = node_factory(shm_tag=f"t-{uuid.uuid4().hex[:8]}")
    cores = Cores(ep, 4)
    try:
        cores.wait(lambda: all(c.attached for c in cores.cores))
        v1 = publish(redis_client, run_keys, mlp_weights(1), Version(1, 1))[0].version
        cores.wait(lambda: all(v == v1 for v in cores.current))
        # Two versions land while the watch hears nothing: each core's next beat names the
        # newest (clone pattern), and the seq gap says one landed notification was missed.
        v2 = publish(redis_client, run_keys, mlp_weights(2), Version(1, 2))[0].version
        wait_for(lambda: node.newest() == v2, TIMEOUT_S, what="v2 at the node")
        v3 = publish(redis_client, run_keys, mlp_weights(3), Version(1, 3))[0].version
        wait_for(lambda: node.newest() == v3, TIMEOUT_S, what="v3 at the node")
        cores.wait(lambda: all(v == v3 for v in cores.current), use_watch=False)
        assert all(u.shared for u in cores.updates)
        assert all(c.missed_notifications_total >= 1 for c in cores.cores)
    finally:
        cores.close()


def test_actors_without_a_watch_still_hear_landed_versions_on_their_own_sockets(
    redis_client: redis.Redis, run_keys: Keys, node_factory
) -> None:
    _, ep = node_factory(shm_tag=f"t-{uuid.uuid4().hex[:8]}", heartbeat_s=4.0, parent_timeout_s=10.0)
    cores = Cores(ep, 3, watch=False)
    try:
        cores.wait(lambda: all(c.attached for c in cores.cores))  # right after a beat
        v1 = publish(redis_client, run_keys, mlp_weights(1), Version(1, 1))[0].version
        # Well before the next beat: it came with the landed notification.
        cores.wait(lambda: all(v == v1 for v in cores.current), timeout=2.5)
        assert all(u.shared for u in cores.updates)
    finally:
        cores.close()


def test_a_many_chunk_version_fetched_over_several_connections_arrives_whole_over_the_socket(
    redis_client: redis.Redis, run_keys: Keys, node_factory
) -> None:
    _, ep = node_factory()
    cores = Cores(ep, 1, watch=False)
    cores.cores[0].use_shm = False
    try:
        state = mlp_weights(5, rows=400_000)
        manifest, _ = publish(redis_client, run_keys, state, Version(1, 1))
        assert manifest.chunks >= 4
        cores.wait(lambda: cores.current[0] == manifest.version)
        update = cores.updates[0]
        assert not update.shared
        for name, a in state.items():
            np.testing.assert_array_equal(update.arrays[name], a)
    finally:
        cores.close()


def test_a_corrupt_chunk_in_redis_never_becomes_visible_in_the_ring(
    redis_client: redis.Redis, run_keys: Keys, node_factory
) -> None:
    node, ep = node_factory(shm_tag=f"t-{uuid.uuid4().hex[:8]}")
    cores = Cores(ep, 2)
    try:
        cores.wait(lambda: all(c.attached for c in cores.cores))
        v1 = publish(redis_client, run_keys, mlp_weights(1), Version(1, 1))[0].version
        cores.wait(lambda: all(v == v1 for v in cores.current))
        manifest, chunks = blob.pack(mlp_weights(2, rows=300_000), Version(1, 2), "mlp", 0)
        bad = bytearray(chunks[1])
        bad[10] ^= 0xFF
        blob.write(redis_client, run_keys, manifest, [chunks[0], bytes(bad), *chunks[2:]])
        wait_for(lambda: node.counters["upstream_errors_total"] >= 1, TIMEOUT_S, what="the refusal")
        assert node.newest() == v1
        assert node.store.shm is not None and manifest.version.packed() not in [
            node.store.shm.slot_version(i) for i in range(node.store.shm.slots)
        ]
        for _ in range(5):
            cores.pump()
        assert all(v == v1 for v in cores.current)  # still acting with the good one
        v3 = publish(redis_client, run_keys, mlp_weights(3), Version(1, 3))[0].version
        cores.wait(lambda: all(v == v3 for v in cores.current))
    finally:
        cores.close()
