"""Learner Publisher -> real Redis -> CacheNode -> ModelClient, over real ZeroMQ sockets."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

import msgpack
import numpy as np
import pytest
import redis
import torch
import zmq
from conftest import RedisServer, wait_for

from canopy import wire
from canopy.cache import blob
from canopy.cache.client import ModelClient
from canopy.cache.node import CacheNode
from canopy.config import CacheConfig
from canopy.errors import ProtocolError
from canopy.keys import Keys
from canopy.learner.network import ARCH, QNetwork
from canopy.learner.publisher import Publisher
from canopy.redisconn import connect
from canopy.version import Version

TIMEOUT_S = 10.0


def weights(seed: int) -> dict[str, np.ndarray]:
    torch.manual_seed(seed)
    return QNetwork(4, 2, [16, 16]).export()


def assert_same_arrays(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert list(got) == list(expected)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])


@dataclass
class Node:
    node: CacheNode
    fetch: str
    notify: str
    thread: threading.Thread
    errors: list[BaseException]


@pytest.fixture
def node(redis_server: RedisServer, run_keys: Keys) -> Iterator[Node]:
    """A CacheNode under the real Redis root, served in a thread; always stopped."""
    r = connect(redis_server.cluster_config(), "cache", 0)
    cache = CacheNode(CacheConfig(poll_s=0.1, keep_versions=3), r, run_keys)
    fetch, notify = cache.bind("tcp://127.0.0.1:0", "tcp://127.0.0.1:0")
    stop, errors = threading.Event(), []

    def serve() -> None:
        try:
            cache.serve(stop)
        except BaseException as exc:  # recorded: a crash must fail the test
            errors.append(exc)
            raise

    thread = threading.Thread(target=serve, name="cache-node", daemon=True)
    thread.start()
    try:
        yield Node(cache, fetch, notify, thread, errors)
    finally:
        stop.set()
        thread.join(timeout=5)
        r.close()
        assert not thread.is_alive(), "cache node did not stop"


@pytest.fixture
def model_client(node: Node) -> Iterator[ModelClient]:
    client = ModelClient(node.fetch, node.notify, request_timeout_s=2.0)
    client.start()
    try:
        yield client
    finally:
        client.stop()


def receive(client: ModelClient, version: Version) -> tuple:
    """Wait until the client hands out `version` (older ones may come first)."""
    got = None

    def arrived() -> bool:
        nonlocal got
        update = client.wait(timeout=0.2)
        if update is not None:
            got = update
        return got is not None and got[0] == version

    wait_for(arrived, TIMEOUT_S, what=f"version {version} at the model client")
    return got


def test_a_published_version_reaches_the_model_client_with_equal_arrays(
    redis_client: redis.Redis, run_keys: Keys, node: Node, model_client: ModelClient
) -> None:
    publisher = Publisher(redis_client, run_keys, learner_id=0, keep=8)
    state = weights(0)

    version = publisher.publish(state, step=0, arch=ARCH)

    got_version, manifest, arrays = receive(model_client, version)
    assert got_version == version == Version(publisher.epoch, 0)
    assert manifest.arch == ARCH
    assert_same_arrays(arrays, state)
    assert model_client.current == version
    assert node.node.counters["versions_fetched_total"] == 1
    assert redis_client.get(run_keys.model_latest) == str(version).encode()


def test_a_later_version_supersedes_the_earlier_one(
    redis_client: redis.Redis, run_keys: Keys, node: Node, model_client: ModelClient
) -> None:
    publisher = Publisher(redis_client, run_keys, learner_id=0, keep=8)
    first = publisher.publish(weights(0), step=0, arch=ARCH)
    receive(model_client, first)

    newer_state = weights(1)
    second = publisher.publish(newer_state, step=50, arch=ARCH)
    _, _, arrays = receive(model_client, second)

    assert second > first
    assert_same_arrays(arrays, newer_state)
    assert model_client.wait(timeout=0.3) is None  # nothing older comes back afterwards
    assert model_client.current == second


def test_a_client_that_joins_late_gets_the_current_version(
    redis_client: redis.Redis, run_keys: Keys, node: Node
) -> None:
    publisher = Publisher(redis_client, run_keys, learner_id=0, keep=8)
    version = publisher.publish(weights(2), step=7, arch=ARCH)
    wait_for(lambda: node.node.counters["policy_version"] == str(version), TIMEOUT_S, what="node fetch")

    late = ModelClient(node.fetch, node.notify)
    late.start()
    try:
        _, _, arrays = receive(late, version)
    finally:
        late.stop()
    assert_same_arrays(arrays, weights(2))


def test_a_corrupt_newer_version_is_never_delivered_and_the_client_keeps_the_older_one(
    redis_client: redis.Redis, run_keys: Keys, node: Node, model_client: ModelClient
) -> None:
    publisher = Publisher(redis_client, run_keys, learner_id=0, keep=8)
    good = publisher.publish(weights(0), step=1, arch=ARCH)
    receive(model_client, good)

    bad_version = Version(publisher.epoch, 2)
    manifest, chunks = blob.pack(weights(1), bad_version, ARCH, learner=0)
    corrupt = bytearray(chunks[0])
    corrupt[10] ^= 0xFF
    blob.write(redis_client, run_keys, manifest, [bytes(corrupt), *chunks[1:]])

    wait_for(lambda: node.node.counters["upstream_errors_total"] >= 1, TIMEOUT_S, what="an upstream error")
    assert model_client.wait(timeout=1.0) is None
    assert model_client.current == good
    assert node.node.counters["policy_version"] == str(good)

    # The tree still works: the next good version goes through.
    fixed = publisher.publish(weights(3), step=3, arch=ARCH)
    _, _, arrays = receive(model_client, fixed)
    assert_same_arrays(arrays, weights(3))


def last_error(node: Node) -> str:
    return str(node.node.counters.get("last_upstream_error", ""))


def test_versions_with_an_oversized_or_missing_chunk_in_redis_are_refused_and_the_next_lands(
    redis_client: redis.Redis, run_keys: Keys, node: Node, model_client: ModelClient
) -> None:
    state = {"big": np.arange(600_000, dtype=np.float32)}  # three chunks
    oversized, chunks = blob.pack(state, Version(5, 1), ARCH, learner=0)
    # Refused from its length alone: the replies after it are never read, and must not be
    # taken for the next version's chunks.
    blob.write(redis_client, run_keys, oversized, [chunks[0] + b"x", *chunks[1:]])
    wait_for(lambda: "over its limit" in last_error(node), TIMEOUT_S, what="the oversized chunk refused")
    missing, chunks = blob.pack(state, Version(5, 2), ARCH, learner=0)
    blob.write(redis_client, run_keys, missing, chunks[:-1])
    wait_for(lambda: "missing" in last_error(node), TIMEOUT_S, what="the missing chunk refused")

    good, chunks = blob.pack({"big": state["big"] + 1}, Version(5, 3), ARCH, learner=0)
    blob.write(redis_client, run_keys, good, chunks)
    _, _, arrays = receive(model_client, good.version)
    assert_same_arrays(arrays, {"big": state["big"] + 1})
    assert node.node.counters["policy_version"] == "5.3"
    assert not ({Version(5, 1), Version(5, 2)} & set(node.node.store.versions))


def test_publisher_epochs_increase_across_instances_and_a_new_epoch_supersedes_any_step(
    redis_client: redis.Redis, run_keys: Keys, node: Node, model_client: ModelClient
) -> None:
    first = Publisher(redis_client, run_keys, learner_id=0, keep=8)
    old = first.publish(weights(0), step=1000, arch=ARCH)
    receive(model_client, old)

    restarted = Publisher(redis_client, run_keys, learner_id=0, keep=8)
    assert restarted.epoch == first.epoch + 1
    assert int(redis_client.get(run_keys.epoch)) == restarted.epoch
    assert Publisher(redis_client, run_keys, learner_id=1, keep=8).epoch == first.epoch + 2

    new = restarted.publish(weights(1), step=0, arch=ARCH)
    _, _, arrays = receive(model_client, new)
    assert new > old
    assert_same_arrays(arrays, weights(1))


def test_publisher_keeps_the_newest_blobs_and_a_bounded_ledger_even_of_a_dead_learners_versions(
    redis_client: redis.Redis, run_keys: Keys
) -> None:
    dead = Publisher(redis_client, run_keys, learner_id=0, keep=2, keep_ledger=3)
    versions = [dead.publish(weights(0), step=s, arch=ARCH) for s in range(4)]

    present = [bool(redis_client.exists(run_keys.model_manifest(v))) for v in versions]
    assert present == [False, False, True, True]
    assert not redis_client.exists(run_keys.model_chunk(versions[0], 0))
    entries = [bool(redis_client.exists(run_keys.ledger_version(v))) for v in versions]
    assert entries == [False, True, True, True]
    ledger = redis_client.hgetall(run_keys.ledger_version(versions[-1]))
    assert ledger[b"step"] == b"3" and ledger[b"epoch"] == str(dead.epoch).encode()

    # The learner dies with two blobs in Redis; its successor's publishes trim them with their entries.
    successor = Publisher(redis_client, run_keys, learner_id=1, keep=2, keep_ledger=3)
    versions += [successor.publish(weights(1), step=s, arch=ARCH) for s in range(3)]
    index = [Version.parse(v) for v in redis_client.zrange(run_keys.ledger_index, 0, -1)]
    assert index == versions[-3:]
    assert len(redis_client.keys(run_keys.prefix + "ledger:version:*")) == 3
    assert not any(redis_client.exists(run_keys.model_manifest(v)) for v in versions[:-2])
    assert not redis_client.keys(f"{run_keys.prefix}model:{dead.epoch}.*")


def test_blob_read_returns_what_write_stored_and_refuses_missing_parts(
    redis_client: redis.Redis, run_keys: Keys
) -> None:
    state = {"big": np.arange(300_000, dtype=np.float32)}  # two chunks
    v = Version(9, 1)
    manifest, chunks = blob.pack(state, v, ARCH, learner=0)
    blob.write(redis_client, run_keys, manifest, chunks)

    got_manifest, got_chunks = blob.read(redis_client, run_keys, v)
    assert got_chunks == chunks
    assert_same_arrays(blob.unpack(got_manifest, got_chunks), state)

    with pytest.raises(ProtocolError, match="not in Redis"):
        blob.read(redis_client, run_keys, Version(9, 2))
    redis_client.delete(run_keys.model_chunk(v, 1))
    with pytest.raises(ProtocolError, match="missing chunks"):
        blob.read(redis_client, run_keys, v)


def fetch_socket(node: Node) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(node.fetch)
    return sock


BAD_FETCHES = [
    pytest.param([b"\xc1 garbage"], id="garbage-header"),
    pytest.param([msgpack.packb({"op": "explode"})], id="unknown-op"),
    pytest.param([msgpack.packb({"op": "get", "version": "latest"})], id="version-not-an-id"),
    pytest.param([msgpack.packb({"op": "get", "version": "1.\u00b2"})], id="version-with-superscript-digit"),
    pytest.param([b"\x00" * 5000], id="oversize-request"),
]


@pytest.mark.parametrize("frames", BAD_FETCHES)
def test_a_malformed_fetch_gets_an_error_and_the_node_keeps_serving(
    redis_client: redis.Redis, run_keys: Keys, node: Node, frames: list[bytes]
) -> None:
    version = Publisher(redis_client, run_keys, learner_id=0, keep=8).publish(weights(0), step=0, arch=ARCH)
    wait_for(lambda: node.node.counters["policy_version"] == str(version), TIMEOUT_S, what="node fetch")
    bad = fetch_socket(node)
    try:
        bad.send_multipart(frames)
        if len(b"".join(frames)) <= 4096:  # ZeroMQ drops larger requests (MAXMSGSIZE) unanswered
            assert bad.poll(5000), f"no error reply; node errors: {node.errors!r}"
            msg = wire.decode(bad.recv_multipart(), 1 << 20)
            assert (msg.op, msg.header["code"]) == ("error", "bad_request")
            assert node.node.counters["rejected_total"] == 1
    finally:
        bad.close(0)

    good = fetch_socket(node)
    try:
        good.send_multipart(wire.encode({"op": "get", "version": str(version)}))
        assert good.poll(5000), f"node stopped answering; node errors: {node.errors!r}"
        msg = wire.decode(good.recv_multipart(), 1 << 26)
    finally:
        good.close(0)
    assert msg.op == "version"
    assert node.thread.is_alive() and not node.errors


def test_a_fetch_for_a_version_the_node_does_not_hold_is_unknown_version(
    redis_client: redis.Redis, run_keys: Keys, node: Node
) -> None:
    sock = fetch_socket(node)
    try:
        sock.send_multipart(wire.encode({"op": "get", "version": "77.1"}))
        assert sock.poll(5000)
        msg = wire.decode(sock.recv_multipart(), 1 << 20)
    finally:
        sock.close(0)
    assert (msg.op, msg.header["code"]) == ("error", "unknown_version")
