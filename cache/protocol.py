"""The cache tree's wire protocol, shared by nodes (both sides) and actor clients.

Every tier speaks the same two-socket clone pattern (zguide ch. 5), so a node's parent
may be another node and a child may be a node or an actor:

    notify (PUB -> SUB):  topic frame, then {op: notify, version, seq, node, host, shm, arriving}
        topic `v` (TOPIC_LANDED): sent when a version lands (seq + 1);
        topic `b` (TOPIC_BEAT): the same again every heartbeat period with the same seq:
        late joiners and children that missed one catch up from the next beat, and a
        silent parent is a dead parent;
        topic `a` (TOPIC_ARRIVING): `arriving` names a version whose first chunk just
        came in (same seq): child nodes ask for it at once and get it streamed
        (cut-through). Actors do not subscribe to it (PUB filters on the topic, so they
        are not even woken): they wait for `version`, which is complete and, on their
        host, already in shared memory. An actor process that serves many actors may
        subscribe once to `v` for all of them (`client.HostWatch`) and each actor's own
        SUB to `b` only.
    fetch (DEALER -> ROUTER):
        {op: hello}             -> {op: hello, version, seq, node, host, shm, reader}
        {op: get, version}      -> {op: version, manifest}, then one message per chunk:
                                   {op: chunk, version, i} + the chunk's raw frame
        {op: latest}            -> the newest version, as for get
        {op: hb, child}         -> no reply: the child's heartbeat to its parent
    errors: {op: error, code: bad_request | unknown_version | upstream, message}

`version` strings are `<epoch>.<step>`; `shm` names the host's shared-memory ring
(cache/shm.py) and `reader` the pin cells given to this child, or "" / -1 for none.

Chunks travel as separate messages so a node can pass chunk i on while chunk i+1 is
still arriving from its parent (cut-through): a tier adds about one chunk's transfer
time, not one model's. Each chunk is checked against its digest in the manifest before
it is passed on (`Assembly`), and the whole payload digest once the last one is in.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Any

import numpy as np
import zmq

from cache import blob
from cluster import wire
from cluster.errors import ProtocolError
from cluster.version import Version

MAX_REQUEST_BYTES = 4096
MAX_NOTIFY_BYTES = 4096
MAX_CHUNK_FRAME = blob.CHUNK_BYTES
MAX_REPLY_BYTES = blob.CHUNK_BYTES + wire.MAX_HEADER_BYTES  # one message: a chunk and its header
HOST = socket.gethostname()


TOPIC_LANDED, TOPIC_BEAT, TOPIC_ARRIVING = b"v", b"b", b"a"
TOPICS = (TOPIC_LANDED, TOPIC_BEAT, TOPIC_ARRIVING)


def notify(version: str, seq: int, node: str, shm: str, arriving: str = "", topic: bytes = b"") -> list:
    """The frames of one notification; the topic defaults to what the fields say it is."""
    topic = topic or (TOPIC_ARRIVING if arriving else TOPIC_BEAT)
    header = {"op": "notify", "version": version, "seq": seq, "node": node, "host": HOST, "shm": shm}
    return [topic, *wire.encode({**header, "arriving": arriving})]


def recv_notify(sock: zmq.Socket) -> tuple[wire.Message, Version | None, int]:
    """Take one queued notification without blocking: (message, version or None, seq).

    Raises zmq.Again when none is queued and ProtocolError when one is malformed.
    """
    frames = sock.recv_multipart(zmq.NOBLOCK)
    if len(frames) < 2 or frames[0] not in TOPICS:
        raise ProtocolError("notification without a known topic frame")
    msg = wire.decode(frames[1:], MAX_NOTIFY_BYTES)
    text = header_str(msg.header, "version")
    try:
        seq = int(msg.header.get("seq", 0))
    except (ValueError, TypeError):
        raise ProtocolError("notification seq is not an integer") from None
    return msg, (Version.parse(text) if text else None), seq


def version_messages(manifest: blob.Manifest, chunks: Sequence[bytes | memoryview]) -> list[list]:
    """The reply to `get`: the manifest message, then one message per chunk."""
    return [version_header(manifest), *(chunk_message(manifest.version, i, c) for i, c in enumerate(chunks))]


def version_header(manifest: blob.Manifest) -> list:
    return wire.encode({"op": "version", "manifest": manifest.to_fields()})


def chunk_message(version: Version, i: int, chunk: bytes | memoryview) -> list:
    return wire.encode(
        {"op": "chunk", "version": str(version), "i": i}, {"c": np.frombuffer(chunk, np.uint8)}
    )


class Assembly:
    """The receiving side of one streamed `version` reply, a message at a time.

    Example:
        a = Assembly()
        while not a.feed(sock.recv_multipart(copy=False)): ...
        manifest, chunks = a.manifest, a.chunks   # every chunk checked; digest not yet

    `feed` returns True once every chunk is in. A `version` message (re)starts the
    assembly; chunks of another version are stale replies and are ignored. Raises
    ProtocolError on an error reply, a chunk out of order, or a chunk whose digest is
    wrong (the assembly is then reset).
    """

    def __init__(self) -> None:
        self.manifest: blob.Manifest | None = None
        self.chunks: list[memoryview] = []

    @property
    def complete(self) -> bool:
        return self.manifest is not None and len(self.chunks) == self.manifest.chunks

    def reset(self) -> None:
        self.manifest, self.chunks = None, []

    def feed(self, frames: Sequence[zmq.Frame | bytes]) -> bool:
        return self.feed_message(wire.decode(frames, MAX_CHUNK_FRAME))

    def feed_message(self, msg: wire.Message) -> bool:
        if msg.op == "error":
            self.reset()
            raise ProtocolError(f"{msg.header.get('code')}: {msg.header.get('message')}")
        if msg.op == "version":
            self.manifest, self.chunks = blob.Manifest.from_fields(msg.header.get("manifest") or {}), []
            return False
        if msg.op != "chunk":
            raise ProtocolError(f"expected a version or chunk reply, got {msg.op!r}")
        if self.manifest is None or header_str(msg.header, "version") != str(self.manifest.version):
            return False  # a late chunk of an earlier request
        i, data = msg.header.get("i"), msg.arrays.get("c")
        if i != len(self.chunks) or data is None or len(msg.arrays) != 1:
            self.reset()
            raise ProtocolError(f"chunk {i!r} out of order or malformed")
        try:
            blob.check_chunk(self.manifest, i, data.data)
        except ProtocolError:
            self.reset()
            raise
        self.chunks.append(data.data)
        return self.complete


def header_str(header: dict[str, Any], key: str, limit: int = 200) -> str:
    value = header.get(key, "")
    if not isinstance(value, str) or len(value) > limit:
        raise ProtocolError(f"field {key!r} must be a string of at most {limit} characters")
    return value
