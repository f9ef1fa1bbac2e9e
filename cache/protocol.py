"""The cache tree's wire protocol, shared by nodes (both sides) and actor clients.

Every message of the cache tree is built and checked here, and nowhere else: the serve
thread (cache/serving.py), the upstream thread (cache/upstream.py), the store's ready-made
replies (cache/store.py) and the actors' client (cache/client.py) name ops by the constants
below, build messages with the builders and read them with the checks.

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
    errors: {op: error, code: bad_request | unknown_version | forbidden, message}

With CURVE keys (canopy/curve.py) each op, and subscribing to the notify PUB, is for the
client roles ROLES names; a node refuses any other role's request with `forbidden`.

`version` strings are `<epoch>.<step>`; `shm` names the host's shared-memory ring
(cache/shm.py) and `reader` the pin cells given to this child, or "" / -1 for none.
String fields are at most MAX_FIELD_CHARS long; a message larger than its socket's limit
(MAX_REQUEST_BYTES, MAX_NOTIFY_BYTES, MAX_REPLY_BYTES) is dropped by ZeroMQ unread.

Chunks travel as separate messages so a node can pass chunk i on while chunk i+1 is
still arriving from its parent (cut-through): a tier adds about one chunk's transfer
time, not one model's. Each chunk is checked against its digest in the manifest before
it is passed on (`Assembly`), and the whole payload digest once the last one is in.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq

from canopy import wire
from canopy.cache import blob
from canopy.curve import ACTOR, CACHE, EVALUATOR
from canopy.errors import ProtocolError
from canopy.version import Version

# ---- ops ------------------------------------------------------------------------------
NOTIFY = "notify"  # PUB -> SUB
HELLO = "hello"  # request and its reply
GET = "get"
LATEST = "latest"
HB = "hb"
SUBSCRIBE = "subscribe"  # not a message: connecting a SUB to the notify PUB
VERSION = "version"  # replies to get / latest: the manifest, then its chunks
CHUNK = "chunk"
ERROR = "error"

# ---- error codes ----------------------------------------------------------------------
BAD_REQUEST = "bad_request"  # a request that fails the checks: never retried as is
UNKNOWN_VERSION = "unknown_version"  # not held (evicted, never published, or lost upstream)
FORBIDDEN = "forbidden"  # an op the caller's role may not use (ROLES)

# ---- who may ask (client roles of canopy/curve.py) -------------------------------------
_CHILDREN = frozenset({ACTOR, EVALUATOR, CACHE})  # whoever follows a node: leaves and child nodes
ROLES: dict[str, frozenset[str]] = {
    HELLO: _CHILDREN,
    GET: _CHILDREN,
    LATEST: _CHILDREN,
    HB: _CHILDREN,
    SUBSCRIBE: _CHILDREN,
}
# Who may connect at all (ZAP): to the fetch ROUTER, and to the notify PUB.
FETCH_ROLES = frozenset().union(*(roles for op, roles in ROLES.items() if op != SUBSCRIBE))
NOTIFY_ROLES = ROLES[SUBSCRIBE]
FETCH_DOMAIN, NOTIFY_DOMAIN = "cache-fetch", "cache-notify"

# ---- limits ---------------------------------------------------------------------------
MAX_REQUEST_BYTES = 4096
MAX_NOTIFY_BYTES = 4096
MAX_CHUNK_FRAME = blob.CHUNK_BYTES
MAX_REPLY_BYTES = blob.CHUNK_BYTES + wire.MAX_HEADER_BYTES  # one message: a chunk and its header
MAX_FIELD_CHARS = 200
CHUNK_ARRAY = "c"  # the name of a chunk message's one raw frame

HOST = socket.gethostname()

TOPIC_LANDED, TOPIC_BEAT, TOPIC_ARRIVING = b"v", b"b", b"a"
TOPICS = (TOPIC_LANDED, TOPIC_BEAT, TOPIC_ARRIVING)


# ---- notify ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Notice:
    """One checked notification (the fields its receivers act on)."""

    version: Version | None  # the newest version the sender holds; None before its first
    seq: int
    host: str  # the sender's host: its `shm` ring can be read only there
    shm: str
    arriving: Version | None  # topic `a`: the version whose chunks are coming in


def notify(
    version: Version | str | None,
    seq: int,
    node: str,
    shm: str,
    arriving: Version | str | None = "",
    topic: bytes = b"",
) -> list:
    """The frames of one notification; the topic defaults to what the fields say it is."""
    arriving = _text(arriving)
    topic = topic or (TOPIC_ARRIVING if arriving else TOPIC_BEAT)
    header = {
        "op": NOTIFY,
        "version": _text(version),
        "seq": seq,
        "node": node,
        "host": HOST,
        "shm": shm,
        "arriving": arriving,
    }
    return [topic, *wire.encode(header)]


def recv_notify(sock: zmq.Socket) -> Notice:
    """Take one queued notification without blocking.

    Raises zmq.Again when none is queued and ProtocolError when one is malformed.
    """
    frames = sock.recv_multipart(zmq.NOBLOCK)
    if len(frames) < 2 or frames[0] not in TOPICS:
        raise ProtocolError("notification without a known topic frame")
    header = wire.decode(frames[1:], MAX_NOTIFY_BYTES).header
    try:
        seq = int(header.get("seq", 0))
    except (ValueError, TypeError):
        raise ProtocolError("notification seq is not an integer") from None
    return Notice(
        _version_field(header, "version"),
        seq,
        _str_field(header, "host"),
        _str_field(header, "shm"),
        _version_field(header, "arriving"),
    )


# ---- requests (child -> parent, fetch socket) -----------------------------------------
def hello() -> list:
    """A child's first request: the parent's newest version and its shared-memory offer."""
    return wire.encode({"op": HELLO})


def get(version: Version | str) -> list:
    """A request for one version: its manifest, then its chunks."""
    return wire.encode({"op": GET, "version": str(version)})


def heartbeat(child: str) -> list:
    """A child's sign of life to its parent (no reply)."""
    return wire.encode({"op": HB, "child": child})


def read_request(frames: Sequence[zmq.Frame | bytes]) -> wire.Message:
    """A request's frames (after the ROUTER's identity), checked as a wire message. The
    parent dispatches on its op (HELLO, LATEST, HB) and hands any other to
    `requested_version`, which refuses all but GET."""
    return wire.decode(frames, MAX_REQUEST_BYTES)


def requested_version(msg: wire.Message) -> Version:
    """The version a `get` asks for; ProtocolError for a bad id or an op no parent takes."""
    if msg.op != GET:
        raise ProtocolError(f"unknown op {msg.op!r}")
    return Version.parse(_str_field(msg.header, "version"))


# ---- replies (parent -> child, fetch socket) ------------------------------------------
@dataclass(frozen=True)
class Hello:
    """A checked `hello` reply: what the parent holds and what it offers this child."""

    version: Version | None
    host: str
    shm: str
    reader: int  # the pin cells of the host's ring given to this child; -1: none


def hello_reply(version: Version | None, seq: int, node: str, shm: str, reader: int) -> list:
    """The answer to hello: newest version and seq, the host's ring and this child's pin cells (-1: none)."""
    return wire.encode(
        {
            "op": HELLO,
            "version": _text(version),
            "seq": seq,
            "node": node,
            "host": HOST,
            "shm": shm,
            "reader": reader,
        }
    )


def read_hello(msg: wire.Message) -> Hello:
    """A hello reply's checked fields; ProtocolError when one is malformed."""
    header = msg.header
    try:
        reader = int(header.get("reader", -1))
    except (ValueError, TypeError):
        raise ProtocolError("hello reader is not an integer") from None
    return Hello(
        _version_field(header, "version"), _str_field(header, "host"), _str_field(header, "shm"), reader
    )


def error_reply(code: str, message: str) -> list:
    """`code` is BAD_REQUEST or UNKNOWN_VERSION; `message` is for people."""
    return wire.error_reply(code, message)


def read_reply(frames: Sequence[zmq.Frame | bytes]) -> wire.Message:
    """A reply's frames, checked as a wire message of at most one chunk."""
    return wire.decode(frames, MAX_CHUNK_FRAME)


def version_messages(manifest: blob.Manifest, chunks: Sequence[bytes | memoryview]) -> list[list]:
    """The reply to `get`: the manifest message, then one message per chunk."""
    return [version_header(manifest), *(chunk_message(manifest.version, i, c) for i, c in enumerate(chunks))]


def version_header(manifest: blob.Manifest) -> list:
    """The first message of a version reply: the manifest."""
    return wire.encode({"op": VERSION, "manifest": manifest.to_fields()})


def chunk_message(version: Version, i: int, chunk: bytes | memoryview) -> list:
    """Chunk i of a version as one message: its header, then the raw chunk frame."""
    return wire.encode(
        {"op": CHUNK, "version": str(version), "i": i}, {CHUNK_ARRAY: np.frombuffer(chunk, np.uint8)}
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
        """Every chunk the manifest names is in."""
        return self.manifest is not None and len(self.chunks) == self.manifest.chunks

    def reset(self) -> None:
        """Forget the version being assembled."""
        self.manifest, self.chunks = None, []

    def feed(self, frames: Sequence[zmq.Frame | bytes]) -> bool:
        """`feed_message` for a reply's raw frames; True once every chunk is in."""
        return self.feed_message(read_reply(frames))

    def feed_message(self, msg: wire.Message) -> bool:
        """Take one checked reply message; True once every chunk is in."""
        if msg.op == ERROR:
            self.reset()
            raise ProtocolError(f"{msg.header.get('code')}: {msg.header.get('message')}")
        if msg.op == VERSION:
            self.manifest, self.chunks = blob.Manifest.from_fields(msg.header.get("manifest") or {}), []
            return False
        if msg.op != CHUNK:
            raise ProtocolError(f"expected a version or chunk reply, got {msg.op!r}")
        if self.manifest is None or _str_field(msg.header, "version") != str(self.manifest.version):
            return False  # a late chunk of an earlier request
        i, data = msg.header.get("i"), msg.arrays.get(CHUNK_ARRAY)
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


# ---- fields ---------------------------------------------------------------------------
def _text(version: Version | str | None) -> str:
    """A version field's wire form: "" stands for none."""
    return "" if version is None else str(version)


def _str_field(header: dict[str, Any], key: str) -> str:
    value = header.get(key, "")
    if not isinstance(value, str) or len(value) > MAX_FIELD_CHARS:
        raise ProtocolError(f"field {key!r} must be a string of at most {MAX_FIELD_CHARS} characters")
    return value


def _version_field(header: dict[str, Any], key: str) -> Version | None:
    text = _str_field(header, key)
    return Version.parse(text) if text else None
