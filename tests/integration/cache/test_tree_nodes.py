"""Node-under-node trees over real sockets and a real Redis root: single flight, catch-up,
codecs end to end, shared-memory delivery, and failover when a parent process is killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator

import numpy as np
import pytest
import redis
import zmq
from conftest import REPO_ROOT, RedisServer, mlp_weights, stop_process, wait_for

from canopy import wire
from canopy.cache import blob, codecs, protocol
from canopy.cache.client import ModelClient
from canopy.cache.node import CacheNode
from canopy.cache.upstream import Parent
from canopy.config import CacheConfig
from canopy.keys import Keys
from canopy.redisconn import connect
from canopy.version import Version

TIMEOUT_S = 10.0
# Failover takes about parent_timeout_s (1 s) plus a fetch; the bound is generous because
# CI shares 2 cores. The latency itself is a benchmark figure, not a test assertion.
FAILOVER_S = 6.0
FAST = {"poll_s": 0.1, "heartbeat_s": 0.1, "parent_timeout_s": 0.6, "keep_versions": 3}


class Tree:
    """In-thread CacheNodes; every one is stopped at teardown."""

    def __init__(self, redis_server: RedisServer, keys: Keys):
        self.redis_server, self.keys = redis_server, keys
        self.stops: list[tuple[threading.Event, threading.Thread, redis.Redis]] = []

    def node(self, parents: list[Parent] | None = None, name: str = "n", shm_tag: str = "", **cfg) -> tuple:
        r = connect(self.redis_server.cluster_config(), "cache", len(self.stops))
        node = CacheNode(
            CacheConfig(**{**FAST, **cfg}), r, self.keys, parents=parents, name=name, shm_tag=shm_tag
        )
        fetch, notify = node.bind("tcp://127.0.0.1:0", "tcp://127.0.0.1:0")
        stop = threading.Event()
        thread = threading.Thread(target=node.serve, args=(stop,), daemon=True)
        thread.start()
        self.stops.append((stop, thread, r))
        return node, Parent(fetch, notify)

    def close(self) -> None:
        for stop, thread, r in self.stops:
            stop.set()
            thread.join(timeout=5)
            r.close()
        assert not any(t.is_alive() for _, t, _ in self.stops), "a cache node did not stop"


@pytest.fixture
def tree(redis_server: RedisServer, run_keys: Keys) -> Iterator[Tree]:
    t = Tree(redis_server, run_keys)
    try:
        yield t
    finally:
        t.close()


def publish(r: redis.Redis, keys: Keys, state: dict, version: Version, encoder=None) -> blob.Manifest:
    manifest, chunks = blob.pack(state, version, "mlp", 0, encoder=encoder)
    blob.write(r, keys, manifest, chunks)
    return manifest


def client_for(parent: Parent, *more: Parent, **kw) -> ModelClient:
    c = ModelClient(
        parent.fetch,
        parent.notify,
        request_timeout_s=3.0,
        parents=[(p.fetch, p.notify) for p in more],
        parent_timeout_s=0.6,
        heartbeat_s=0.1,
        **kw,
    )
    c.start()
    return c


def receive(client: ModelClient, version: Version, timeout: float = TIMEOUT_S):
    got = None

    def arrived() -> bool:
        nonlocal got
        update = client.wait(timeout=0.1)
        if update is not None:
            got = update
        return got is not None and got.version == version

    wait_for(arrived, timeout, what=f"version {version} at the client")
    return got


def test_a_node_under_a_node_delivers_the_version_to_actors_with_equal_arrays(
    redis_client: redis.Redis, run_keys: Keys, tree: Tree
) -> None:
    root, root_ep = tree.node(name="root")
    leaf, leaf_ep = tree.node([root_ep], name="leaf")
    client = client_for(leaf_ep, use_shm=False)
    try:
        state = mlp_weights(1)
        v = publish(redis_client, run_keys, state, Version(1, 5)).version
        update = receive(client, v)
    finally:
        client.stop()
    for name, a in state.items():
        np.testing.assert_array_equal(update.arrays[name], a)
    assert leaf.counters["parent"] == root_ep.fetch
    assert root.counters["upstream_fetches_total"] == leaf.counters["upstream_fetches_total"] == 1


def receive_version(sock: zmq.Socket) -> tuple[blob.Manifest, list]:
    """Read one streamed `version` reply (header, then chunk messages), chunks checked."""
    assembly = protocol.Assembly()
    while True:
        assert sock.poll(int(TIMEOUT_S * 1000)), "the version reply stopped coming"
        if assembly.feed(sock.recv_multipart(copy=False)):
            assert assembly.manifest is not None
            return assembly.manifest, assembly.chunks


def test_many_children_asking_at_once_cause_one_upstream_fetch_per_node(
    redis_client: redis.Redis, run_keys: Keys, tree: Tree
) -> None:
    root, root_ep = tree.node(name="root", poll_s=30.0)  # only the notification can trigger it
    leaf, leaf_ep = tree.node([root_ep], name="leaf")
    v = Version(1, 9)
    manifest, chunks = blob.pack(mlp_weights(2, rows=20_000), v, "mlp", 0)
    ctx = zmq.Context.instance()
    socks = []
    try:
        for _ in range(40):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(leaf_ep.fetch)
            socks.append(s)
        time.sleep(0.2)
        # Everyone asks for a version neither node holds yet; then it is published.
        for s in socks:
            s.send_multipart(wire.encode({"op": "get", "version": str(v)}))
        blob.write(redis_client, run_keys, manifest, chunks)
        for s in socks:
            got, got_chunks = receive_version(s)
            assert got.version == v and blob.check_payload(got, got_chunks)
    finally:
        for s in socks:
            s.close(0)
    assert leaf.counters["upstream_fetches_total"] == 1
    assert root.counters["upstream_fetches_total"] == 1
    assert root.counters["served_bytes_total"] == manifest.size  # the root sent it once


def test_a_child_that_joins_late_catches_up_from_the_next_heartbeat_without_a_resend(
    redis_client: redis.Redis, run_keys: Keys, tree: Tree
) -> None:
    root, root_ep = tree.node(name="root")
    for step in range(3):
        v = publish(redis_client, run_keys, mlp_weights(step), Version(1, step)).version
        wait_for(lambda v=v: root.counters["policy_version"] == str(v), TIMEOUT_S, what="root fetch")
    seq_before = root.server.seq
    late, late_ep = tree.node([root_ep], name="late")
    client = client_for(late_ep, use_shm=False)
    try:
        update = receive(client, v)
    finally:
        client.stop()
    np.testing.assert_array_equal(update.arrays["layers.0.bias"], mlp_weights(2)["layers.0.bias"])
    assert root.server.seq == seq_before == 3  # nothing was re-announced as new for the late joiner
    assert late.counters["upstream_fetches_total"] == 1  # only the newest, not the history


def test_an_actor_never_goes_back_to_an_older_epoch(
    redis_client: redis.Redis, run_keys: Keys, tree: Tree
) -> None:
    _, ep = tree.node(name="root")
    client = client_for(ep, use_shm=False)
    try:
        newer = publish(redis_client, run_keys, mlp_weights(1), Version(5, 0)).version
        receive(client, newer)
        publish(redis_client, run_keys, mlp_weights(2), Version(4, 999))
        assert client.wait(timeout=1.0) is None
        assert client.current == newer
    finally:
        client.stop()


@pytest.mark.parametrize("codec", ["bf16", "int8delta"])
def test_lossy_codecs_reach_the_actor_within_their_error_bound(
    redis_client: redis.Redis, run_keys: Keys, tree: Tree, codec: str
) -> None:
    _, root_ep = tree.node(name="root")
    _, leaf_ep = tree.node([root_ep], name="leaf")
    enc = codecs.Encoder(codec, keyframe_every=4)
    client = client_for(leaf_ep, use_shm=False)
    try:
        publish(redis_client, run_keys, mlp_weights(0), Version(1, 0), enc)  # keyframe
        state = {k: a + 0.01 for k, a in mlp_weights(0).items()}
        m = publish(redis_client, run_keys, state, Version(1, 1), enc)
        update = receive(client, m.version)
    finally:
        client.stop()
    assert m.codec == codec
    for name, a in state.items():
        assert np.abs(update.arrays[name] - a).max() <= max(np.abs(a).max() * 2**-8, 1e-3)


def test_a_late_actor_on_a_delta_version_fetches_its_keyframe_first(
    redis_client: redis.Redis, run_keys: Keys, tree: Tree
) -> None:
    root, root_ep = tree.node(name="root")
    enc = codecs.Encoder("int8delta", keyframe_every=8)
    for step in range(3):
        m = publish(
            redis_client,
            run_keys,
            {k: a + 0.01 * step for k, a in mlp_weights(0).items()},
            Version(1, step),
            enc,
        )
    wait_for(lambda: root.counters["policy_version"] == str(m.version), TIMEOUT_S, what="root fetch")
    client = client_for(root_ep, use_shm=False)
    try:
        update = receive(client, m.version)
    finally:
        client.stop()
    assert m.codec == "int8delta" and update.manifest.base == "1.0"


def test_same_host_actors_get_read_only_views_of_one_shared_copy(
    redis_client: redis.Redis, run_keys: Keys, tree: Tree
) -> None:
    _, root_ep = tree.node(name="root")
    leaf, leaf_ep = tree.node([root_ep], name="leaf", shm_tag=f"t-{uuid.uuid4().hex[:8]}")
    clients = [client_for(leaf_ep) for _ in range(3)]
    try:
        state = mlp_weights(3)
        v = publish(redis_client, run_keys, state, Version(2, 1)).version
        updates = [receive(c, v) for c in clients]
    finally:
        for c in clients:
            c.stop()
    assert all(u.shared for u in updates)
    assert leaf.counters["served_bytes_total"] == 0  # only notifications crossed the sockets
    for u in updates:
        assert not u.arrays["layers.0.weight"].flags.writeable
        np.testing.assert_array_equal(u.arrays["layers.0.weight"], state["layers.0.weight"])


def bad_reply_server() -> tuple[zmq.Socket, zmq.Socket, Parent]:
    ctx = zmq.Context.instance()
    router, pub = ctx.socket(zmq.ROUTER), ctx.socket(zmq.PUB)
    for s in (router, pub):
        s.setsockopt(zmq.LINGER, 0)
    router.bind("tcp://127.0.0.1:0")
    pub.bind("tcp://127.0.0.1:0")
    return (
        router,
        pub,
        Parent(router.getsockopt_string(zmq.LAST_ENDPOINT), pub.getsockopt_string(zmq.LAST_ENDPOINT)),
    )


def test_a_node_rejects_a_corrupt_version_from_a_node_parent_and_keeps_serving(tree: Tree) -> None:
    router, pub, fake = bad_reply_server()
    node, _ = tree.node([fake], name="child", parent_timeout_s=5.0)
    v = Version(1, 1)
    manifest, chunks = blob.pack(mlp_weights(1), v, "mlp", 0)
    corrupt = bytearray(chunks[0])
    corrupt[3] ^= 0xFF
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while node.counters["upstream_errors_total"] == 0 and time.monotonic() < deadline:
            pub.send_multipart(protocol.notify(str(v), 1, "fake", ""))
            if router.poll(100):
                ident, *_ = router.recv_multipart()
                for msg in protocol.version_messages(manifest, [bytes(corrupt)]):
                    router.send_multipart([ident, *msg])
        assert node.counters["upstream_errors_total"] >= 1
        assert node.counters["policy_version"] == "0.0" and node.newest() is None
    finally:
        router.close(0)
        pub.close(0)


def test_a_node_passes_early_chunks_on_before_its_parent_sent_the_last_one(tree: Tree) -> None:
    router, pub, fake = bad_reply_server()
    node, node_ep = tree.node([fake], name="mid", parent_timeout_s=5.0)
    v = Version(1, 1)
    manifest, chunks = blob.pack(mlp_weights(1, rows=100_000), v, "mlp", 0)
    assert manifest.chunks >= 3
    messages = protocol.version_messages(manifest, chunks)
    child = zmq.Context.instance().socket(zmq.DEALER)
    child.setsockopt(zmq.LINGER, 0)
    child.connect(node_ep.fetch)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while True:  # the fake parent announces v until the node asks for it
            assert time.monotonic() < deadline, "the node never asked its parent for the version"
            pub.send_multipart(protocol.notify(str(v), 1, "fake", ""))
            if router.poll(100):
                ident, *frames = router.recv_multipart()
                if wire.decode(frames, 4096).op == "get":
                    break
        for msg in messages[:2]:  # the header and chunk 0 only
            router.send_multipart([ident, *msg])
        child.send_multipart(wire.encode({"op": "get", "version": str(v)}))
        assembly = protocol.Assembly()
        while not assembly.chunks:
            assert child.poll(int(TIMEOUT_S * 1000)), "chunk 0 was not passed on"
            assembly.feed(child.recv_multipart(copy=False))
        # Chunk 0 reached the child while the parent still withholds the rest.
        assert node.newest() is None and len(assembly.chunks) == 1
        for msg in messages[2:]:
            router.send_multipart([ident, *msg])
        while not assembly.complete:
            assert child.poll(int(TIMEOUT_S * 1000)), "the rest of the version did not follow"
            assembly.feed(child.recv_multipart(copy=False))
        assert blob.unpack(manifest, assembly.chunks)["layers.0.bias"].shape == (100_000,)
        wait_for(lambda: node.newest() == v, TIMEOUT_S, what="the node holding the version")
        assert node.counters["upstream_fetches_total"] == 1
    finally:
        child.close(0)
        router.close(0)
        pub.close(0)


def spawn_node(
    redis_server: RedisServer, keys: Keys, parents: list, name: str
) -> tuple[subprocess.Popen, Parent]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "canopy.cache.standalone",
            "--run",
            keys.run,
            "--redis",
            f"{redis_server.host}:{redis_server.port}",
            "--password-file",
            str(redis_server.password_file),
            "--parents",
            json.dumps(parents),
            "--name",
            name,
            *(f"--set={k}={json.dumps(v)}" for k, v in FAST.items()),
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    line = proc.stdout.readline()
    eps = json.loads(line)
    return proc, Parent(eps["fetch"], eps["notify"])


@pytest.mark.fault
def test_a_child_whose_parent_is_killed_mid_transfer_reattaches_to_redis(
    redis_server: RedisServer, redis_client: redis.Redis, run_keys: Keys, tree: Tree
) -> None:
    mid, mid_ep = spawn_node(redis_server, run_keys, [[]], "mid")
    try:
        leaf, leaf_ep = tree.node([mid_ep, Parent()], name="leaf")
        client = client_for(leaf_ep, use_shm=False)
        try:
            v1 = publish(redis_client, run_keys, mlp_weights(1), Version(1, 1)).version
            receive(client, v1)
            # A 44 MB version: the mid node dies once the leaf has some of its chunks, not all.
            v2 = publish(redis_client, run_keys, mlp_weights(2, rows=1_600_000), Version(1, 2)).version
            wait_for(
                lambda: v2 in leaf.store.partial, TIMEOUT_S, interval=0.001, what="the leaf receiving v2"
            )
            mid.send_signal(signal.SIGKILL)
            wait_for(lambda: leaf.counters["parent"] == "redis", FAILOVER_S, what="reattach to Redis")
            assert client.current == v1  # keeps acting with what it holds meanwhile
            receive(client, v2)
        finally:
            client.stop()
    finally:
        stop_process(mid)
    assert leaf.counters["failovers_total"] == 1


@pytest.mark.fault
def test_an_actor_whose_leaf_is_killed_keeps_its_version_and_fails_over_to_the_next_node(
    redis_server: RedisServer, redis_client: redis.Redis, run_keys: Keys, tree: Tree
) -> None:
    leaf, leaf_ep = spawn_node(redis_server, run_keys, [[]], "leaf")
    try:
        _, spare_ep = tree.node(name="spare")
        client = client_for(leaf_ep, spare_ep, use_shm=False)
        try:
            v1 = publish(redis_client, run_keys, mlp_weights(1), Version(1, 1)).version
            receive(client, v1)
            leaf.send_signal(signal.SIGKILL)
            # Stale lasts only from the parent's silence to the spare's first beat (which
            # names v1, the version held), too short to poll for; failing over is what lasts.
            wait_for(lambda: client.failovers_total >= 1, FAILOVER_S, what="the client to fail over")
            assert client.current == v1
            v2 = publish(redis_client, run_keys, mlp_weights(2), Version(1, 2)).version
            receive(client, v2, timeout=FAILOVER_S)
            assert not client.stale
        finally:
            client.stop()
    finally:
        stop_process(leaf)


def test_an_actor_whose_only_parent_is_killed_reports_stale_and_keeps_acting_with_its_version(
    redis_server: RedisServer, redis_client: redis.Redis, run_keys: Keys
) -> None:
    leaf, leaf_ep = spawn_node(redis_server, run_keys, [[]], "leaf")
    try:
        client = client_for(leaf_ep, use_shm=False)
        try:
            v1 = publish(redis_client, run_keys, mlp_weights(1), Version(1, 1)).version
            receive(client, v1)
            assert not client.stale
            leaf.send_signal(signal.SIGKILL)
            wait_for(lambda: client.stale, FAILOVER_S, what="the client to report itself stale")
            assert client.current == v1
        finally:
            client.stop()
    finally:
        stop_process(leaf)
