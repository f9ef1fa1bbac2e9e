"""replay/server.py behind real ZeroMQ sockets, with the real InsertClient and SampleClient."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import msgpack
import numpy as np
import pytest
import zmq
from conftest import wait_for

from canopy import wire
from canopy.config import ReplayConfig
from canopy.errors import DeadlineExceeded, ProtocolError
from canopy.replay.connect import request_stats
from canopy.replay.insert import InsertClient
from canopy.replay.packed import Unpacker
from canopy.replay.sample import SampleClient
from canopy.replay.server import ReplayServer

OBS_DIM = 4
TIMEOUT_S = 10.0


def transitions(n: int, start: int = 0) -> dict[str, np.ndarray]:
    ids = np.arange(start, start + n)
    return {
        "obs": np.repeat(ids[:, None], OBS_DIM, axis=1).astype(np.float32),
        "action": (ids % 2).astype(np.int64),
        "reward": np.ones(n, np.float32),
        "next_obs": np.repeat(ids[:, None] + 1, OBS_DIM, axis=1).astype(np.float32),
        "discount": np.full(n, 0.99, np.float32),
        "version": np.full(n, (1 << 32) | 7, np.int64),
    }


@dataclass
class Running:
    server: ReplayServer
    endpoint: str
    thread: threading.Thread
    errors: list[BaseException]

    def stats(self) -> dict:
        return request_stats(self.endpoint, timeout=TIMEOUT_S)

    def alive(self) -> bool:
        return self.thread.is_alive() and not self.errors


@pytest.fixture
def replay_shard() -> Iterator[Callable[..., Running]]:
    """Factory: a ReplayServer on a free loopback port, served in a thread; always stopped."""
    started: list[tuple[threading.Event, Running]] = []

    def start(**overrides: object) -> Running:
        cfg = ReplayConfig(**{"min_size": 1, "samples_per_insert": 0.0, "capacity": 1000, **overrides})
        server = ReplayServer(cfg, seed=0)
        endpoint = server.bind("tcp://127.0.0.1:0")
        stop, errors = threading.Event(), []

        def serve() -> None:
            try:
                server.serve(stop)
            except BaseException as exc:  # recorded: a crash must fail the test
                errors.append(exc)
                raise

        thread = threading.Thread(target=serve, name="replay-shard", daemon=True)
        running = Running(server, endpoint, thread, errors)
        started.append((stop, running))
        thread.start()
        return running

    try:
        yield start
    finally:
        for stop, running in started:
            stop.set()
            running.thread.join(timeout=5)
            assert not running.thread.is_alive(), "replay server thread did not stop"


@pytest.fixture
def dealer() -> Iterator[Callable[[str], zmq.Socket]]:
    """Factory: raw DEALER sockets for hand-written (and malformed) requests."""
    socks: list[zmq.Socket] = []

    def connect(endpoint: str) -> zmq.Socket:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        socks.append(sock)
        return sock

    try:
        yield connect
    finally:
        for s in socks:
            s.close(0)


def reply(sock: zmq.Socket, shard: Running, timeout: float = 5.0) -> wire.Message:
    assert sock.poll(int(timeout * 1000)), f"no reply within {timeout}s; server errors: {shard.errors!r}"
    return wire.decode(sock.recv_multipart(), 1 << 26)


def test_inserts_are_acked_and_samples_have_the_inserted_signature(replay_shard) -> None:
    shard = replay_shard()
    inserter = InsertClient(shard.endpoint, inflight=2)
    try:
        for i in range(5):
            inserter.insert(transitions(16, start=16 * i), timeout=TIMEOUT_S)
        inserter.flush(timeout=TIMEOUT_S)
        assert inserter.inflight == 0 and inserter.errors_total == 0
    finally:
        inserter.close()
    assert shard.stats()["items"] == 80

    sampler = SampleClient([shard.endpoint], batch=32, inflight=2)
    try:
        batch = sampler.next(timeout=TIMEOUT_S)
    finally:
        sampler.close()
    assert batch["obs"].shape == (32, OBS_DIM) and batch["obs"].dtype == np.float32
    assert batch["next_obs"].shape == (32, OBS_DIM)
    for name in ("action", "reward", "discount", "version", "slot"):
        assert batch[name].shape == (32,), name
    assert batch["action"].dtype == np.int64 and batch["version"].dtype == np.int64
    # Rows hang together: item k has obs k, next_obs k + 1, action k % 2.
    ids = batch["obs"][:, 0].astype(np.int64)
    np.testing.assert_array_equal(batch["next_obs"][:, 0], ids + 1)
    np.testing.assert_array_equal(batch["action"], ids % 2)
    assert ((ids >= 0) & (ids < 80)).all()
    assert (batch["version"] == (1 << 32) | 7).all()


def test_an_insert_ack_names_the_request_and_the_table_size(replay_shard, dealer) -> None:
    shard = replay_shard()
    sock = dealer(shard.endpoint)
    sock.send_multipart(wire.encode({"op": "insert", "req": 41, "n": 8}, transitions(8)))
    msg = reply(sock, shard)
    assert msg.header == {"op": "ack", "size": 8, "req": 41}


def test_the_rate_limiter_parks_samples_until_min_size_then_serves_them(replay_shard) -> None:
    shard = replay_shard(min_size=100, sample_wait_s=30.0)
    sampler = SampleClient([shard.endpoint], batch=8, inflight=2)
    inserter = InsertClient(shard.endpoint, inflight=4)
    try:
        wait_for(lambda: shard.stats()["parked"] == 2, TIMEOUT_S, what="two parked sample requests")
        with pytest.raises(DeadlineExceeded):
            sampler.next(timeout=0.3)  # parked, not answered
        inserter.insert(transitions(60), timeout=TIMEOUT_S)
        inserter.flush(timeout=TIMEOUT_S)
        with pytest.raises(DeadlineExceeded):
            sampler.next(timeout=0.3)  # 60 < min_size: still parked
        inserter.insert(transitions(40, start=60), timeout=TIMEOUT_S)
        inserter.flush(timeout=TIMEOUT_S)

        batch = sampler.next(timeout=TIMEOUT_S)
    finally:
        sampler.close()
        inserter.close()
    assert batch["obs"].shape == (8, OBS_DIM)
    stats = shard.stats()
    assert stats["not_ready_total"] == 0
    assert stats["samples_total"] >= 8


def test_a_parked_sample_times_out_with_not_ready(replay_shard, dealer) -> None:
    shard = replay_shard(min_size=10, sample_wait_s=0.2)
    sock = dealer(shard.endpoint)
    sock.send_multipart(wire.encode({"op": "sample", "batch": 4, "req": 3}))
    msg = reply(sock, shard)
    assert (msg.op, msg.header["code"], msg.header["req"]) == ("error", "not_ready", 3)
    assert shard.stats()["not_ready_total"] == 1


def test_samples_per_insert_holds_inserts_back_until_the_learner_samples(replay_shard, dealer) -> None:
    # spi 1, min_size 10, buffer 16: diff = inserted - sampled must stay <= 26.
    shard = replay_shard(min_size=10, samples_per_insert=1.0, error_buffer=16.0)
    sock = dealer(shard.endpoint)
    sock.send_multipart(wire.encode({"op": "insert", "req": 1}, transitions(30)))
    assert reply(sock, shard).op == "ack"  # diff 30 > 26 now: the next insert is parked
    sock.send_multipart(wire.encode({"op": "insert", "req": 2}, transitions(4, start=30)))
    assert not sock.poll(300), "an insert above the band was acked at once"
    assert shard.stats()["limiter_state"] == "blocking_inserts"

    sock.send_multipart(wire.encode({"op": "sample", "batch": 8, "req": 3}))
    replies = {m.header["req"]: m for m in (reply(sock, shard), reply(sock, shard))}
    assert replies[3].op == "batch"
    assert replies[2].op == "ack" and replies[2].header["size"] == 34


MALFORMED = [
    # (frames, part of the error message, request id the error reply must echo)
    pytest.param([b"\xc1\xc1 not msgpack"], "header is not valid msgpack", None, id="garbage-header"),
    pytest.param([b"\x00" * 40, b"\x01\x02"], "header is not valid msgpack", None, id="garbage-frames"),
    pytest.param([msgpack.packb({"op": "explode", "req": 9})], "unknown op", 9, id="unknown-op"),
    pytest.param([msgpack.packb({"req": 9})], "'op'", 9, id="missing-op"),
    pytest.param([msgpack.packb({"op": "sample", "batch": 0, "req": 9})], "batch", 9, id="sample-batch-zero"),
    pytest.param(
        [msgpack.packb({"op": "sample", "batch": "8", "req": 9})], "batch", 9, id="sample-batch-str"
    ),
    pytest.param(
        [msgpack.packb({"op": "sample", "batch": 8, "req": 9, "packed": 1})],
        "packed",
        9,
        id="sample-packed-not-bool",
    ),
    pytest.param(
        [msgpack.packb({"op": "sample", "batch": 8, "req": 9, "batches": 0})],
        "batches",
        9,
        id="sample-batches-zero",
    ),
    pytest.param(
        [msgpack.packb({"op": "sample", "batch": 256, "req": 9, "batches": 257})],
        "batches",
        9,
        id="sample-batches-too-many-items",
    ),
    pytest.param(
        [msgpack.packb({"op": "sample", "batch": 8, "req": 9, "batches": True})],
        "batches",
        9,
        id="sample-batches-bool",
    ),
    pytest.param(
        [msgpack.packb({"op": "sample", "batch": 8, "req": 9, "packed": True, "unique_frames": "yes"})],
        "unique_frames",
        9,
        id="sample-unique-frames-not-bool",
    ),
    pytest.param(
        wire.encode({"op": "insert", "req": 9}, {**transitions(4), "obs": np.zeros((4, 7), np.float32)}),
        "signature",
        9,
        id="insert-wrong-signature",
    ),
    pytest.param(wire.encode({"op": "insert", "req": 9}), "no arrays", 9, id="insert-without-arrays"),
    pytest.param(
        [msgpack.packb({"op": "insert", "req": 9, "arrays": [["obs", "|O", [1]]]}), b"\x00" * 8],
        "not allowed",
        9,
        id="insert-object-dtype",
    ),
    pytest.param(
        [msgpack.packb({"op": "insert", "req": 9, "arrays": [["obs", "<f4", [4]]]}), b"\x00" * 8],
        "bytes",
        9,
        id="insert-size-mismatch",
    ),
    # An unhashable dtype in an array spec must be a bad request, not a dead shard.
    pytest.param(
        [msgpack.packb({"op": "insert", "req": 9, "arrays": [["obs", ["<f4"], [2]]]}), b"\x00" * 8],
        "dtype",
        9,
        id="insert-dtype-a-list",
    ),
]


@pytest.mark.parametrize(("frames", "message_part", "req"), MALFORMED)
def test_a_malformed_request_gets_an_error_reply_and_the_shard_keeps_serving(
    replay_shard, dealer, frames: list, message_part: str, req: int | None
) -> None:
    shard = replay_shard()
    good = InsertClient(shard.endpoint, inflight=1)
    try:
        good.insert(transitions(8), timeout=TIMEOUT_S)  # the table's signature is now fixed
        good.flush(timeout=TIMEOUT_S)

        bad = dealer(shard.endpoint)
        bad.send_multipart(frames)
        msg = reply(bad, shard)
        assert msg.op == "error"
        assert msg.header["code"] == "bad_request"
        assert message_part in msg.header["message"]
        assert msg.header["req"] == req

        assert shard.alive(), f"server died: {shard.errors!r}"
        good.insert(transitions(8, start=8), timeout=TIMEOUT_S)
        good.flush(timeout=TIMEOUT_S)
    finally:
        good.close()
    stats = shard.stats()
    assert stats["rejected_total"] == 1
    assert stats["items"] == 16
    sampler = SampleClient([shard.endpoint], batch=4, inflight=1)
    try:
        assert sampler.next(timeout=TIMEOUT_S)["obs"].shape == (4, OBS_DIM)
    finally:
        sampler.close()


def test_a_wrong_signature_insert_is_rejected_even_while_the_limiter_parks_inserts(
    replay_shard, dealer
) -> None:
    # spi 1, min_size 1, buffer 5: after 10 items diff = 10 > 6, so a good insert would be
    # parked; a bad one is refused at once instead of waiting in the queue.
    shard = replay_shard(min_size=1, samples_per_insert=1.0, error_buffer=5.0)
    sock = dealer(shard.endpoint)
    sock.send_multipart(wire.encode({"op": "insert", "req": 1}, transitions(10)))
    assert reply(sock, shard).op == "ack"
    bad = {**transitions(2), "obs": np.zeros((2, 9), np.float32)}
    sock.send_multipart(wire.encode({"op": "insert", "req": 2}, bad))
    refused = reply(sock, shard)
    assert refused.op == "error" and refused.header["code"] == "bad_request"
    assert refused.header["req"] == 2
    assert shard.stats()["parked"] == 0

    sock.send_multipart(wire.encode({"op": "sample", "batch": 8, "req": 3}))
    assert reply(sock, shard).op == "batch"
    assert shard.alive(), f"server died: {shard.errors!r}"
    assert shard.stats()["rejected_total"] == 1


def test_insert_client_raises_protocol_error_when_the_shard_refuses_its_chunk(replay_shard) -> None:
    shard = replay_shard()
    client = InsertClient(shard.endpoint, inflight=1)
    try:
        client.insert(transitions(4), timeout=TIMEOUT_S)
        client.insert({**transitions(4), "reward": np.ones(4, np.float64)}, timeout=TIMEOUT_S)
        with pytest.raises(ProtocolError, match="refused"):
            client.flush(timeout=TIMEOUT_S)
    finally:
        client.close()
    assert client.errors_total == 1


def test_insert_client_gives_up_after_its_timeout_when_no_shard_answers() -> None:
    silent = zmq.Context.instance().socket(zmq.ROUTER)  # accepts requests, never replies
    silent.setsockopt(zmq.LINGER, 0)
    port = silent.bind_to_random_port("tcp://127.0.0.1")
    client = InsertClient(f"tcp://127.0.0.1:{port}", inflight=1)
    try:
        client.insert(transitions(4), timeout=1.0)  # sent; its ack never comes
        with pytest.raises(DeadlineExceeded):
            client.insert(transitions(4), timeout=0.3)
    finally:
        client.close()
        silent.close(0)


def test_a_learner_samples_from_every_shard(replay_shard) -> None:
    shards = [replay_shard(), replay_shard()]
    for k, shard in enumerate(shards):
        client = InsertClient(shard.endpoint, inflight=1)
        try:
            client.insert(transitions(10, start=1000 * k), timeout=TIMEOUT_S)
            client.flush(timeout=TIMEOUT_S)
        finally:
            client.close()
    sampler = SampleClient([s.endpoint for s in shards], batch=4, inflight=2)
    try:
        origins = [int(sampler.next(timeout=TIMEOUT_S)["obs"][0, 0]) // 1000 for _ in range(50)]
    finally:
        sampler.close()
    assert set(origins) == {0, 1}


def test_a_learner_never_has_more_than_inflight_batches_sampled_ahead_of_what_it_consumed(
    replay_shard,
) -> None:
    # Unused samples waste the shard and fool its samples-per-insert limiter into letting
    # actors run ahead of the learner.
    shard = replay_shard()
    client = InsertClient(shard.endpoint, inflight=1)
    try:
        client.insert(transitions(100), timeout=TIMEOUT_S)
        client.flush(timeout=TIMEOUT_S)
    finally:
        client.close()
    batch, inflight, consumed = 8, 2, 20
    sampler = SampleClient([shard.endpoint], batch=batch, inflight=inflight)
    try:
        for _ in range(consumed):
            sampler.next(timeout=TIMEOUT_S)
        expected = (consumed + inflight) * batch
        wait_for(lambda: shard.stats()["samples_total"] >= expected, TIMEOUT_S, what="the refills")
        assert shard.stats()["samples_total"] == expected
    finally:
        sampler.close()


def test_a_packed_sample_carries_the_same_columns_as_an_unpacked_one(replay_shard, dealer) -> None:
    shard = replay_shard()
    sock = dealer(shard.endpoint)
    sock.send_multipart(wire.encode({"op": "insert", "req": 1}, transitions(50)))
    assert reply(sock, shard).op == "ack"
    sock.send_multipart(wire.encode({"op": "sample", "batch": 16, "req": 2}))
    plain = reply(sock, shard)
    sock.send_multipart(wire.encode({"op": "sample", "batch": 16, "req": 3, "packed": True}))
    msg = reply(sock, shard)
    assert (msg.op, msg.header["req"], list(msg.arrays)) == ("batch", 3, ["packed"])
    assert {k: msg.header[k] for k in ("size", "total")} == {"size": 50, "total": 50.0}
    got = Unpacker()(msg.header, msg.arrays)
    assert {k: (a.dtype, a.shape) for k, a in got.items()} == {
        k: (a.dtype, a.shape) for k, a in plain.arrays.items()
    }
    ids = got["obs"][:, 0].astype(np.int64)  # each row is the item it claims to be
    np.testing.assert_array_equal(got["next_obs"][:, 0], ids + 1)
    np.testing.assert_array_equal(got["action"], ids % 2)
    np.testing.assert_array_equal(got["version"], np.full(16, (1 << 32) | 7))
    np.testing.assert_array_equal(got["slot"], ids)  # slots fill 0, 1, 2, ... in order
    np.testing.assert_array_equal(got["gen"], np.ones(16))
    np.testing.assert_allclose(got["prob"], 1 / 50)


def test_a_sample_client_decodes_packed_batches_from_several_requests_in_flight(replay_shard) -> None:
    shard = replay_shard()
    inserter = InsertClient(shard.endpoint, inflight=2)
    sampler = SampleClient([shard.endpoint], batch=8, inflight=4)
    try:
        inserter.insert(transitions(40), timeout=TIMEOUT_S)
        inserter.flush(timeout=TIMEOUT_S)
        for _ in range(20):
            b = sampler.next(timeout=TIMEOUT_S)
            ids = b["obs"][:, 0].astype(np.int64)
            np.testing.assert_array_equal(b["next_obs"][:, 0], ids + 1)
            np.testing.assert_array_equal(b["slot"], ids)
            assert b["weight"].dtype == np.float32 and b["weight"].shape == (8,)
            sampler.update_priorities(int(b["shard"][0]), b["slot"], b["gen"], np.ones(8))
    finally:
        sampler.close()
        inserter.close()
    assert shard.stats()["rejected_total"] == 0


def test_a_request_for_several_batches_gets_as_many_independent_draws_as_the_limiter_allows(
    replay_shard, dealer
) -> None:
    shard = replay_shard(samples_per_insert=1.0, min_size=10, error_buffer=60.0, sample_wait_s=0.2)
    sock = dealer(shard.endpoint)
    sock.send_multipart(wire.encode({"op": "insert", "req": 1}, transitions(30)))
    assert reply(sock, shard).op == "ack"
    # diff = 30 - 0 may fall to min_diff = 10 - 60: 80 items, two batches of 32 but not three
    sock.send(msgpack.packb({"op": "sample", "batch": 32, "batches": 3, "req": 2, "packed": True}))
    msg = reply(sock, shard)
    assert (msg.op, msg.header["batches"], msg.header["req"]) == ("batch", 2, 2)
    got = Unpacker()(msg.header, msg.arrays)
    assert got["slot"].shape == (64,)
    np.testing.assert_array_equal(got["obs"][:, 0], got["slot"])  # each row is its item
    stats = shard.stats()
    assert stats["samples_total"] == 64 and stats["sample_requests_total"] == 1
    sock.send(msgpack.packb({"op": "sample", "batch": 32, "batches": 3, "req": 3, "packed": True}))
    assert reply(sock, shard).header["code"] == "not_ready"  # parked: not even one batch fits


def test_a_sample_client_asks_for_several_small_batches_a_request_and_hands_them_out_one_by_one(
    replay_shard,
) -> None:
    shard = replay_shard()
    inserter = InsertClient(shard.endpoint, inflight=1)
    inserter.insert(transitions(100), timeout=TIMEOUT_S)
    inserter.flush(timeout=TIMEOUT_S)
    inserter.close()
    batch, inflight, consumed = 8, 8, 40
    sampler = SampleClient([shard.endpoint], batch=batch, inflight=inflight)
    try:
        seen = []
        for _ in range(consumed):
            b = sampler.next(timeout=TIMEOUT_S)
            assert b["obs"].shape == (batch, OBS_DIM) and b["weight"].shape == (batch,)
            np.testing.assert_array_equal(b["obs"][:, 0], b["slot"])
            seen.append(b["slot"])
        assert sampler.group == inflight // 2  # tiny batches: as many a request as keeps two in flight
        # Still never more than `inflight` batches drawn ahead of what was handed out.
        wait_for(lambda: shard.stats()["samples_total"] >= consumed * batch, TIMEOUT_S, what="refills")
        stats = shard.stats()
        assert consumed * batch <= stats["samples_total"] <= (consumed + inflight) * batch
        assert stats["sample_requests_total"] < consumed
        assert len({s.tobytes() for s in seen}) == consumed  # distinct draws, not one batch repeated
    finally:
        sampler.close()
