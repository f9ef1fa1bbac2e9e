"""Packed sample replies: every column of a batch in one ZeroMQ frame.

Place in the data flow: a SampleClient (replay/client.py) asks with `packed: true`; the
shard (replay/server.py) then gathers the batch's columns straight into one buffer
(`Table.gather` with `out=` views, no per-column arrays, no per-column frames) and
replies in wire.py's format with a single uint8 array `packed` and a header `layout`:
[[name, dtype, shape, offset], ...], offsets aligned to ALIGN bytes. Any wire.decode
reads such a reply; `Unpacker` turns it back into named arrays, as views on the received
frame (no copy). Requests without `packed` get the one-frame-per-array reply as before.

Why: a reply of nine small arrays costs ten frame sends on the shard and ten spec checks
on the client, most of a CartPole batch's time; one frame costs one of each.

Buffers: a reply below ZeroMQ's copy threshold is copied by send, so one buffer per
layout is reused for every reply. A larger one (Atari stacks, megabytes) goes out
zero-copy, tracked; up to POOL such buffers per layout are reused once ZeroMQ has sent
them, so the shard neither copies nor page-faults a fresh buffer per reply.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import msgpack
import numpy as np
import zmq

from cluster import wire
from cluster.errors import ProtocolError

ALIGN = 64
POOL = 12  # large reply buffers kept per layout: more than the requests a client keeps in flight
PACKED = "packed"  # the name of the one array of a packed reply
_SNDMORE = int(zmq.SNDMORE)


@dataclass
class _Buffer:
    data: np.ndarray  # uint8 [nbytes]
    views: dict[str, np.ndarray]  # name -> [n, *shape] view into data
    tracker: zmq.MessageTracker | None = None  # set while ZeroMQ may still read data


@dataclass
class Layout:
    """Where each column of an n-item batch sits in the reply buffer, with the reply's
    pre-encoded header tail; built once per (table signature, n) and reused."""

    columns: list[tuple[str, np.dtype, tuple[int, ...]]]  # name, dtype, shape of one item
    n: int
    offsets: list[int] = field(init=False)
    nbytes: int = field(init=False)
    tail: bytes = field(init=False)  # msgpack of the `arrays` and `layout` header entries
    buffers: list[_Buffer] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.offsets, at = [], 0
        spec = []
        for name, dtype, shape in self.columns:
            at = -(-at // ALIGN) * ALIGN
            self.offsets.append(at)
            spec.append([name, dtype.str, [self.n, *shape], at])
            at += self.n * math.prod(shape) * dtype.itemsize
        self.nbytes = at
        self.small = at < zmq.COPY_THRESHOLD  # send copies it: one buffer serves every reply
        self.tail = (
            msgpack.packb("arrays")
            + msgpack.packb([[PACKED, "|u1", [at]]])
            + msgpack.packb("layout")
            + msgpack.packb(spec)
        )

    def acquire(self) -> _Buffer:
        """A buffer ZeroMQ no longer reads (the reused one for small replies)."""
        for buf in self.buffers:
            if buf.tracker is None or buf.tracker.done:
                buf.tracker = None
                return buf
        buf = self._new()
        if len(self.buffers) < (1 if self.small else POOL):
            self.buffers.append(buf)
        return buf  # all pooled ones still in flight: a one-off buffer

    def _new(self) -> _Buffer:
        data = np.empty(self.nbytes, np.uint8)
        views = {
            name: np.ndarray((self.n, *shape), dtype, buffer=data, offset=off)
            for (name, dtype, shape), off in zip(self.columns, self.offsets, strict=True)
        }
        return _Buffer(data, views)

    def header(self, fields: dict) -> bytes:
        """msgpack of `fields` plus `arrays` and `layout` (one map, as wire.decode expects)."""
        if len(fields) > 13:
            raise ValueError("a packed reply header holds at most 13 fields besides its layout")
        body = msgpack.packb(fields)
        return bytes((0x80 | (len(fields) + 2),)) + body[1:] + self.tail

    def send(self, sock: zmq.Socket, ident: bytes, fields: dict, buf: _Buffer) -> None:
        send = sock.send  # int flags: send_multipart spends microseconds on enum arithmetic
        send(ident, _SNDMORE)
        send(self.header(fields), _SNDMORE)
        if self.small:
            send(buf.data, 0, copy=True)
        else:
            buf.tracker = send(buf.data, 0, copy=False, track=True)


class Layouts:
    """Layouts of one table by batch length (a table's signature never changes once set)."""

    MAX = 16  # distinct batch lengths kept (max_times_sampled can shorten a batch)

    def __init__(self) -> None:
        self.by_n: dict[int, Layout] = {}

    def get(self, n: int, columns: Callable[[], list[tuple[str, np.dtype, tuple[int, ...]]]]) -> Layout:
        """The layout for n items; `columns()` is called only to build a new one."""
        layout = self.by_n.get(n)
        if layout is None:
            if len(self.by_n) >= self.MAX:
                self.by_n.clear()
            layout = self.by_n[n] = Layout(columns(), n)
        return layout


class Unpacker:
    """Client side: named arrays from a packed reply, as views on its frame.

    The layout is checked (names, dtypes, shapes, offsets inside the frame) once per
    distinct layout; ProtocolError on anything wrong.
    """

    def __init__(self) -> None:
        self.raw: object = None
        self.specs: list[tuple[str, np.dtype, tuple[int, ...], int]] = []
        self.nbytes = -1

    def __call__(self, header: dict, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        layout = header.pop("layout")
        packed = arrays.get(PACKED)
        if packed is None or len(arrays) != 1 or packed.dtype != np.uint8 or packed.ndim != 1:
            raise ProtocolError(f"a packed reply carries exactly one uint8 array {PACKED!r}")
        if layout != self.raw or len(packed) != self.nbytes:
            self.specs = _check_layout(layout, len(packed))
            self.raw, self.nbytes = layout, len(packed)
        return {
            name: np.ndarray(shape, dtype, buffer=packed, offset=off)
            for name, dtype, shape, off in self.specs
        }


def _check_layout(layout: object, size: int) -> list[tuple[str, np.dtype, tuple[int, ...], int]]:
    if not isinstance(layout, list) or len(layout) > wire.MAX_ARRAYS:
        raise ProtocolError(f"'layout' must be a list of at most {wire.MAX_ARRAYS} entries")
    specs, names = [], set()
    for entry in layout:
        if not (isinstance(entry, list) and len(entry) == 4):
            raise ProtocolError("layout entry must be [name, dtype, shape, offset]")
        name, dtype, shape, off = entry
        if not isinstance(name, str) or len(name) > 64 or name in names:
            raise ProtocolError("layout names must be distinct short strings")
        if not isinstance(dtype, str) or dtype not in wire.ALLOWED_DTYPES:
            raise ProtocolError(f"layout {name!r}: dtype {dtype!r} is not allowed")
        if (
            not isinstance(shape, list)
            or len(shape) > 8
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in shape)
        ):
            raise ProtocolError(f"layout {name!r}: shape must be a list of at most 8 sizes")
        dt = np.dtype(dtype)
        nbytes = math.prod(shape) * dt.itemsize
        if not isinstance(off, int) or isinstance(off, bool) or off < 0 or off + nbytes > size:
            raise ProtocolError(f"layout {name!r}: {nbytes} bytes at offset {off!r} overrun {size}")
        names.add(name)
        specs.append((name, dt, tuple(shape), off))
    return specs
