"""Reads a version's chunks from the Redis root straight into one buffer per version.

Used by a cache node whose parent is Redis (cache/upstream.py), for the chunks only: the
manifest and everything else still go through redis-py. Why not redis-py for the chunks:
without hiredis its parser reads a reply 64 KiB at a time into a BytesIO and copies it out
again; 8 MiB of GETs took 12-14 ms on an idle 2-core box and 21 ms under the broadcast
bench's load, against 2.5 ms with `recv_into` a preallocated buffer. With hiredis (not a
dependency) an MGET of the 8 chunks took 4.3 ms median against this reader's 3.8, but hands
the chunks over only all together and as bytes objects, each copied again into the buffer
the node serves from, so no chunk could be passed on before the last one arrived. GETs go out WINDOW
ahead of the replies read: Redis copies every reply of a batch it has read before writing
any, so with all 8 sent at once the first chunk came after 3.3 ms, with two ahead after 1.5
ms (the last 1.6 ms sooner too), and the node passes chunk 0 on while Redis copies chunk 2.

The buffer is an anonymous mapping advised to use huge pages: a node keeps several versions,
so each one needs fresh memory, and on this VM faulting in 8 MiB of 4 KiB pages cost 5-6 ms
(in the middle of the transfer) against 0.2 ms for 2 MiB pages.

A reply is trusted no more than any other input: each is a bulk string whose length must
fit the chunk limit and the space the manifest leaves; a nil (missing chunk), an error, an
over-long header line or any other reply type raises, and the connection is dropped (its
reply stream is in an unknown state) and opened again on the next read.

With TLS (`cluster.tls`) the socket is wrapped with the same CA and host-name check as the
redis-py client it copies (canopy/tls.py); `recv_into` then decrypts a record (16 KiB at
most) at a time, still straight into the version's buffer.
"""

from __future__ import annotations

import mmap
import socket
import ssl
from collections.abc import Iterator
from typing import Any, NoReturn

import redis

from canopy import tls
from canopy.errors import ProtocolError

MAX_LINE = 4096  # a reply header (`$<n>`) or an error line
WINDOW = 2  # GETs in flight: see the module docstring
DEFAULT_TIMEOUT_S = 10.0


class ChunkReader:
    """GETs of many keys into one preallocated buffer, over a connection of its own.

    Example:
        reader = ChunkReader.for_client(r)
        for i, chunk in enumerate(reader.read(keys, total=manifest.size, limit=blob.CHUNK_BYTES)):
            ...  # chunk: a memoryview on the version's buffer; check it before use
    """

    def __init__(
        self,
        host: str,
        port: int,
        username: str | None = None,
        password: str | None = None,
        db: int = 0,
        client_name: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        connect_timeout_s: float = DEFAULT_TIMEOUT_S,
        ssl_context: ssl.SSLContext | None = None,
    ):
        self.host, self.port, self.username, self.password, self.db = host, port, username, password, db
        self.ssl_context = ssl_context  # None: plain TCP
        self.client_name, self.timeout_s, self.connect_timeout_s = client_name, timeout_s, connect_timeout_s
        self._sock: socket.socket | None = None
        self._pending = b""  # bytes received past the last reply parsed

    @classmethod
    def for_client(cls, r: redis.Redis) -> ChunkReader:
        """A reader with the same server, credentials and TLS settings as `r`."""
        pool = r.connection_pool
        kw: dict[str, Any] = pool.connection_kwargs
        context = None
        if pool.connection_class is redis.SSLConnection:
            if not kw.get("ssl_ca_certs") or not kw.get("ssl_check_hostname"):
                raise ValueError("a cache node reads chunks over TLS only with a client that verifies Redis")
            context = tls.client_context(kw["ssl_ca_certs"])
        elif pool.connection_class is not redis.Connection:
            raise ValueError("a cache node reads chunks over TCP or TLS, not a unix socket")
        if kw.get("credential_provider") is not None:
            raise ValueError("a cache node reads chunks with a username/password client")
        name = kw.get("client_name")
        return cls(
            kw.get("host", "localhost"),
            int(kw.get("port", 6379)),
            kw.get("username"),
            kw.get("password"),
            int(kw.get("db") or 0),
            f"{name}:chunks" if name else None,
            kw.get("socket_timeout") or DEFAULT_TIMEOUT_S,  # a stalled Redis must not hang the node
            kw.get("socket_connect_timeout") or kw.get("socket_timeout") or DEFAULT_TIMEOUT_S,
            context,
        )

    def close(self) -> None:
        """Drop the connection; the next read opens a new one."""
        if self._sock is not None:
            self._sock.close()
        self._sock, self._pending = None, b""

    def read(self, keys: list[str], total: int, limit: int, window: int = WINDOW) -> Iterator[memoryview]:
        """Each key's value in order, as views on one fresh buffer of `total` bytes.

        Raises ProtocolError for a missing key, a value over `limit` bytes or past `total`,
        or a malformed reply; redis.RedisError when Redis answers with an error or the
        connection fails. Stop early only through the generator's close (as `for` and
        `contextlib.closing` do): the connection is then dropped."""
        buf = memoryview(_buffer(total))
        done, offset = 0, 0
        try:
            sock = self._connect()
            gets = [_command(b"GET", k.encode()) for k in keys]
            sock.sendall(b"".join(gets[:window]))
            for i in range(len(keys)):
                if i + window < len(gets):
                    sock.sendall(gets[i + window])
                n = self._bulk_length()
                if n < 0:
                    raise ProtocolError(f"chunk {i} is missing in Redis")
                if n > limit or offset + n > total:
                    raise ProtocolError(f"chunk {i} of {n} bytes: over its limit or past the manifest size")
                view = buf[offset : offset + n]
                self._fill(view)
                if self._take(2) != b"\r\n":
                    raise ProtocolError("a Redis reply does not end its value with CRLF")
                offset += n
                done = i + 1
                yield view
        except OSError as exc:
            raise redis.ConnectionError(f"reading chunks from Redis: {exc}") from None
        finally:
            if done < len(keys):  # replies may be left unread: never parse from mid-stream
                self.close()

    # ---- internals --------------------------------------------------------------------
    def _connect(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
        sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            if self.ssl_context is not None:  # the handshake runs under the connect timeout
                sock = self.ssl_context.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise
        sock.settimeout(self.timeout_s)
        self._sock, self._pending = sock, b""
        try:
            if self.password is not None:
                who = [self.username.encode()] if self.username else []
                self._simple(b"AUTH", *who, self.password.encode())
            if self.db:
                self._simple(b"SELECT", str(self.db).encode())
            if self.client_name:
                self._simple(b"CLIENT", b"SETNAME", self.client_name.encode())
        except BaseException:
            self.close()
            raise
        return sock

    def _simple(self, *args: bytes) -> None:
        """Send one command and expect a `+` status reply."""
        assert self._sock is not None
        self._sock.sendall(_command(*args))
        line = self._line()
        if not line.startswith(b"+"):
            self._raise_for(line, f"{args[0].decode()} expected a status reply")

    def _bulk_length(self) -> int:
        line = self._line()
        if not line.startswith(b"$"):
            self._raise_for(line, "expected a bulk string reply to GET")
        try:
            n = int(line[1:])
        except ValueError:
            raise ProtocolError("a Redis bulk length is not an integer") from None
        if n < -1:
            raise ProtocolError(f"a Redis bulk length of {n}")
        return n

    def _raise_for(self, line: bytes, what: str) -> NoReturn:
        if line.startswith(b"-"):
            raise redis.ResponseError(line[1:201].decode("utf-8", "replace"))
        raise ProtocolError(f"{what}, got {line[:40]!r}")

    def _line(self) -> bytes:
        assert self._sock is not None
        while (end := self._pending.find(b"\r\n")) < 0:
            if len(self._pending) > MAX_LINE:
                raise ProtocolError(f"a Redis reply header over {MAX_LINE} bytes")
            self._pending += self._recv(MAX_LINE)
        line, self._pending = self._pending[:end], self._pending[end + 2 :]
        return line

    def _take(self, n: int) -> bytes:
        out = bytearray(n)
        self._fill(memoryview(out))
        return bytes(out)

    def _fill(self, view: memoryview) -> None:
        """Exactly len(view) bytes into `view`: those already received first, then the socket."""
        assert self._sock is not None
        got = min(len(self._pending), len(view))
        view[:got] = self._pending[:got]
        self._pending = self._pending[got:]
        while got < len(view):
            n = self._sock.recv_into(view[got:])
            if n == 0:
                raise ConnectionError("Redis closed the connection")
            got += n

    def _recv(self, n: int) -> bytes:
        assert self._sock is not None
        data = self._sock.recv(n)
        if not data:
            raise ConnectionError("Redis closed the connection")
        return data


def _buffer(size: int) -> mmap.mmap:
    """`size` writable bytes (at least one) that fault in as huge pages where the kernel allows."""
    buf = mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):  # Linux only; elsewhere plain pages
        buf.madvise(mmap.MADV_HUGEPAGE)
    return buf


def _command(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)
