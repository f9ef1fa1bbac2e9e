"""The cache tree's wire protocol, shared by nodes (both sides) and actor clients.

Every tier speaks the same two-socket clone pattern (zguide ch. 5), so a node's parent
may be another node and a child may be a node or an actor:

    notify (PUB -> SUB):  {op: notify, version, seq, node, host, shm}
        sent when a version lands (seq + 1) and again every heartbeat period with the
        same seq: late joiners and children that missed one catch up from the next
        beat, and a silent parent is a dead parent.
    fetch (DEALER -> ROUTER):
        {op: hello}             -> {op: hello, version, seq, node, host, shm, reader}
        {op: get, version}      -> {op: version, manifest} + one frame per chunk
        {op: latest}            -> the newest version, as for get
        {op: hb, child}         -> no reply: the child's heartbeat to its parent
    errors: {op: error, code: bad_request | unknown_version | upstream, message}

`version` strings are `<epoch>.<step>`; `shm` names the host's shared-memory ring
(cache/shm.py) and `reader` the pin cells given to this child, or "" / -1 for none.
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
MAX_REPLY_BYTES = blob.MAX_BLOB_BYTES
HOST = socket.gethostname()


def notify(version: str, seq: int, node: str, shm: str) -> list:
    return wire.encode(
        {"op": "notify", "version": version, "seq": seq, "node": node, "host": HOST, "shm": shm}
    )


def recv_notify(sock: zmq.Socket) -> tuple[wire.Message, Version | None, int]:
    """Take one queued notification without blocking: (message, version or None, seq).

    Raises zmq.Again when none is queued and ProtocolError when one is malformed.
    """
    msg = wire.decode(sock.recv_multipart(zmq.NOBLOCK), MAX_NOTIFY_BYTES)
    text = header_str(msg.header, "version")
    try:
        seq = int(msg.header.get("seq", 0))
    except (ValueError, TypeError):
        raise ProtocolError("notification seq is not an integer") from None
    return msg, (Version.parse(text) if text else None), seq


def version_frames(manifest: blob.Manifest, chunks: Sequence[bytes | memoryview]) -> list:
    """The reply to `get`: the manifest in the header, each chunk as its own raw frame."""
    return wire.encode(
        {"op": "version", "manifest": manifest.to_fields()},
        {f"c{i}": np.frombuffer(c, dtype=np.uint8) for i, c in enumerate(chunks)},
    )


def parse_version(frames: Sequence[zmq.Frame | bytes]) -> tuple[blob.Manifest, list[memoryview]]:
    """Manifest and chunk views of a `version` reply; raises ProtocolError on anything else.

    Checks the manifest schema and the chunk count only: callers check the digest.
    """
    msg = wire.decode(frames, MAX_REPLY_BYTES)
    if msg.op == "error":
        raise ProtocolError(f"{msg.header.get('code')}: {msg.header.get('message')}")
    if msg.op != "version":
        raise ProtocolError(f"expected a version reply, got {msg.op!r}")
    manifest = blob.Manifest.from_fields(msg.header.get("manifest") or {})
    try:
        chunks = [msg.arrays[f"c{i}"].data for i in range(manifest.chunks)]
    except KeyError:
        raise ProtocolError(f"model {manifest.version}: reply lacks chunks") from None
    if len(msg.arrays) != manifest.chunks:
        raise ProtocolError(
            f"model {manifest.version}: {len(msg.arrays)} chunk frames, expected {manifest.chunks}"
        )
    return manifest, chunks


def header_str(header: dict[str, Any], key: str, limit: int = 200) -> str:
    value = header.get(key, "")
    if not isinstance(value, str) or len(value) > limit:
        raise ProtocolError(f"field {key!r} must be a string of at most {limit} characters")
    return value
