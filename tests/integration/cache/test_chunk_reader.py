"""cache/rawget.py: chunks read from a real Redis into one buffer, and replies it must refuse."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import pytest
import redis

from canopy.cache.rawget import MAX_LINE, ChunkReader
from canopy.errors import ProtocolError
from canopy.keys import Keys

TIMEOUT_S = 10.0


@pytest.fixture
def reader(redis_client: redis.Redis) -> Iterator[ChunkReader]:
    r = ChunkReader.for_client(redis_client)
    try:
        yield r
    finally:
        r.close()


@pytest.mark.parametrize("window", [1, 2, 8])
def test_values_land_in_order_as_views_on_one_buffer(
    redis_client: redis.Redis, run_keys: Keys, reader: ChunkReader, window: int
) -> None:
    values = [bytes([i]) * (1000 + i) for i in range(5)]
    keys = [f"{run_keys.prefix}c{i}" for i in range(5)]
    for k, v in zip(keys, values, strict=True):
        redis_client.set(k, v)

    got = list(reader.read(keys, sum(map(len, values)), limit=2000, window=window))

    assert [bytes(g) for g in got] == values
    assert all(g.obj is got[0].obj for g in got)  # one buffer per read, no copy per chunk
    assert [bytes(g) for g in reader.read(keys[:2], 2001, limit=2000)] == values[:2]  # reused connection


def test_a_missing_or_oversized_value_is_refused_and_the_next_read_starts_clean(
    redis_client: redis.Redis, run_keys: Keys, reader: ChunkReader
) -> None:
    keys = [f"{run_keys.prefix}c{i}" for i in range(3)]
    redis_client.set(keys[0], b"a" * 10)
    redis_client.set(keys[2], b"c" * 10)
    with pytest.raises(ProtocolError, match="chunk 1 is missing"):
        list(reader.read(keys, 30, limit=10))
    # The replies after the refused one were never read: they must not answer the next read.
    redis_client.set(keys[1], b"b" * 11)
    with pytest.raises(ProtocolError, match="over its limit"):
        list(reader.read(keys, 31, limit=10))
    with pytest.raises(ProtocolError, match="past the manifest size"):
        list(reader.read(keys, 25, limit=20))
    with contextlib.closing(reader.read(keys, 31, limit=20)) as replies:
        assert bytes(next(replies)) == b"a" * 10  # stopped early: the connection is dropped
    assert [bytes(g) for g in reader.read(keys[1:], 21, limit=20)] == [b"b" * 11, b"c" * 10]


def test_a_wrong_password_is_a_redis_error(redis_server, run_keys: Keys) -> None:
    bad = ChunkReader(redis_server.host, redis_server.port, redis_server.user, "not-the-password")
    with pytest.raises(redis.ResponseError):
        list(bad.read([f"{run_keys.prefix}c0"], 10, limit=10))


def test_tcp_clients_or_tls_clients_that_verify_the_server_only() -> None:
    with pytest.raises(ValueError, match="not a unix socket"):
        ChunkReader.for_client(redis.Redis(unix_socket_path="/nonexistent.sock"))
    with pytest.raises(ValueError, match="verifies Redis"):
        ChunkReader.for_client(redis.Redis(ssl=True, ssl_cert_reqs="none", ssl_check_hostname=False))


class FakeRedis:
    """A TCP server that answers the first request it reads with `reply`, then hangs up."""

    def __init__(self, reply: bytes):
        self.reply = reply
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(TIMEOUT_S)
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            conn, _ = self.listener.accept()
            with conn:
                conn.settimeout(TIMEOUT_S)
                conn.recv(65536)
                conn.sendall(self.reply)

    def close(self) -> None:
        self.listener.close()
        self.thread.join(timeout=TIMEOUT_S)


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (b"+OK\r\n", ProtocolError),  # not a bulk string
        (b"$abc\r\n", ProtocolError),  # length not an integer
        (b"$-5\r\n", ProtocolError),
        (b"$" + b"9" * (2 * MAX_LINE), ProtocolError),  # a header that never ends
        (b"$4\r\nabcdXY", ProtocolError),  # no CRLF after the value
        (b"-ERR no such thing\r\n", redis.ResponseError),
        (b"$4\r\nab", redis.ConnectionError),  # the server hung up mid-value
    ],
)
def test_malformed_replies_are_refused(reply: bytes, error: type[Exception]) -> None:
    server = FakeRedis(reply)
    reader = ChunkReader("127.0.0.1", server.port, timeout_s=TIMEOUT_S)
    try:
        with pytest.raises(error):
            list(reader.read(["k"], 4, limit=4))
    finally:
        reader.close()
        server.close()
