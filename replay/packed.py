"""Packed sample replies: every column of a batch in one ZeroMQ frame.

Place in the data flow: a SampleClient (replay/sample.py) asks with `packed: true`; the
shard (replay/server.py) then gathers the batch's columns straight into one buffer
(`Table.gather` with `out=` views, no per-column arrays, no per-column frames) and
replies in wire.py's format with a single uint8 array `packed` and a header `layout`:
[[name, dtype, shape, offset], ...], offsets aligned to ALIGN bytes. Any wire.decode
reads such a reply; `Unpacker` turns it back into named arrays, as views on the received
frame (no copy). Requests without `packed` get the one-frame-per-array reply as before.

Why: a reply of nine small arrays costs ten frame sends on the shard and ten spec checks
on the client, most of a CartPole batch's time; one frame costs one of each.

Frame-index replies (pixel tables, asked with `unique_frames: true`): the obs and next_obs
stacks of an item share most of their frames (a stack of 4 and the next one share 3), so
the reply carries frames as a second array `frames` uint8 [u, *frame], and per stacked
column `<name>_frame_index` int32 [n, stack] in the packed buffer; `rebuild` turns those
into the uint8 [n, stack, *frame] stacks on the client. The shard picks the frames
(table.gather_frames): for one-step transitions a window of stack + 1 frames per item, so
both stacks are runs of it and `rebuild` views them in the received frames without
copying a byte; otherwise each distinct frame once, gathered into stacks on the client.
Five frames per item instead of eight for a stack of 4: about 37% fewer bytes on the wire
and, for windows, no client copy (an Atari batch is memory-bandwidth bound: the copy the
client skips weighed more than the bytes the window repeats across items).

Buffers: a reply below ZeroMQ's copy threshold is copied by send, so one buffer per
layout is reused for every reply. A larger one (Atari stacks, megabytes) goes out
zero-copy, tracked; up to POOL such buffers per layout are reused once ZeroMQ has sent
them, so the shard neither copies nor page-faults a fresh buffer per reply.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import msgpack
import numpy as np
import zmq

from canopy import wire
from canopy.errors import ProtocolError

ALIGN = 64
POOL = 12  # large reply buffers kept per layout: more than the requests a client keeps in flight
PACKED = "packed"  # the name of the one array of a packed reply
LAYOUT = "layout"  # the header field that says where each column sits in PACKED
FRAMES = "frames"  # the distinct frames of a unique-frame reply, its second array
INDEX = "_frame_index"  # suffix of the columns that name each stack's frames in FRAMES
_SNDMORE = int(zmq.SNDMORE)


@dataclass
class _Buffer:
    data: np.ndarray  # uint8 [nbytes]
    views: dict[str, np.ndarray]  # name -> [n, *shape] view into data
    frames: np.ndarray | None = None  # unique-frame replies: room for every frame of the batch
    trackers: list[zmq.MessageTracker] = field(default_factory=list)  # sends ZeroMQ may still read

    @property
    def idle(self) -> bool:
        return all(t.done for t in self.trackers)


@dataclass
class Layout:
    """Where each column of an n-item batch sits in the reply buffer, with the reply's
    pre-encoded header tail; built once per (table signature, n) and reused."""

    columns: list[tuple[str, np.dtype, tuple[int, ...]]]  # name, dtype, shape of one item
    n: int
    frames: tuple[int, tuple[int, ...]] | None = None  # unique-frame replies: (most frames, frame shape)
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
        self.layout_tail = msgpack.packb(LAYOUT) + msgpack.packb(spec)
        self.tail = msgpack.packb("arrays") + msgpack.packb([[PACKED, "|u1", [at]]]) + self.layout_tail

    def acquire(self) -> _Buffer:
        """A buffer ZeroMQ no longer reads (the reused one for small replies)."""
        for buf in self.buffers:
            if buf.idle:
                buf.trackers.clear()
                return buf
        buf = self._new()
        if len(self.buffers) < (1 if self.small and self.frames is None else POOL):
            self.buffers.append(buf)
        return buf  # all pooled ones still in flight: a one-off buffer

    def _new(self) -> _Buffer:
        data = np.empty(self.nbytes, np.uint8)
        views = {
            name: np.ndarray((self.n, *shape), dtype, buffer=data, offset=off)
            for (name, dtype, shape), off in zip(self.columns, self.offsets, strict=True)
        }
        frames = None
        if self.frames is not None:
            most, shape = self.frames
            frames = np.empty((most, *shape), np.uint8)
        return _Buffer(data, views, frames)

    def header(self, fields: dict, frames: int = -1) -> bytes:
        """msgpack of `fields` plus `arrays` and `layout` (one map, as wire.decode expects);
        `frames`: how many of the buffer's frames follow (unique-frame layouts)."""
        if len(fields) > 13:
            raise ValueError("a packed reply header holds at most 13 fields besides its layout")
        body = msgpack.packb(fields)
        if frames < 0:
            tail = self.tail
        else:
            specs = [[PACKED, "|u1", [self.nbytes]], [FRAMES, "|u1", [frames, *self.frames[1]]]]
            tail = msgpack.packb("arrays") + msgpack.packb(specs) + self.layout_tail
        return bytes((0x80 | (len(fields) + 2),)) + body[1:] + tail

    def send(self, sock: zmq.Socket, ident: bytes, fields: dict, buf: _Buffer, frames: int = -1) -> None:
        """The reply, with the buffer's first `frames` frames after it (unique-frame layouts)."""
        send = sock.send  # int flags: send_multipart spends microseconds on enum arithmetic
        send(ident, _SNDMORE)
        send(self.header(fields, frames), _SNDMORE)
        more = _SNDMORE if frames >= 0 else 0
        if self.small:
            send(buf.data, more, copy=True)
        else:
            buf.trackers.append(send(buf.data, more, copy=False, track=True))
        if frames >= 0:  # megabytes: zero-copy, and the buffer waits until ZeroMQ is done
            buf.trackers.append(send(buf.frames[:frames], 0, copy=False, track=True))


Columns = list[tuple[str, np.dtype, tuple[int, ...]]]


class Layouts:
    """Layouts of one table by batch length and kind (a table's signature never changes once set)."""

    MAX = 16  # distinct batch lengths kept (max_times_sampled and the limiter can shorten a reply)

    def __init__(self) -> None:
        self.by_n: dict[tuple[int, bool], Layout] = {}

    def get(
        self, n: int, columns: Callable[[], tuple[Columns, tuple[int, tuple[int, ...]] | None]], unique: bool
    ) -> Layout:
        """The layout for n items, unique-frame or not; `columns()` (columns, frames) is called
        only to build a new one."""
        layout = self.by_n.get((n, unique))
        if layout is None:
            if len(self.by_n) >= self.MAX:
                self.by_n.clear()
            cols, frames = columns()
            layout = self.by_n[n, unique] = Layout(cols, n, frames)
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
        """The named arrays; a unique-frame reply's keep FRAMES and the index columns (see
        `rebuild`), every index checked to name one of its frames."""
        layout = header.pop(LAYOUT)
        packed = arrays.get(PACKED)
        frames = arrays.get(FRAMES)
        if (
            packed is None
            or len(arrays) != 1 + (frames is not None)
            or packed.dtype != np.uint8
            or packed.ndim != 1
        ):
            raise ProtocolError(f"a packed reply carries one uint8 array {PACKED!r} (and maybe {FRAMES!r})")
        if layout != self.raw or len(packed) != self.nbytes:
            self.specs = _check_layout(layout, len(packed))
            self.raw, self.nbytes = layout, len(packed)
        out = {
            name: np.ndarray(shape, dtype, buffer=packed, offset=off)
            for name, dtype, shape, off in self.specs
        }
        indexes = [name for name in out if name.endswith(INDEX)]
        if frames is None:
            if indexes:
                raise ProtocolError(f"a reply with frame indexes carries no {FRAMES!r}")
            return out
        if frames.dtype != np.uint8 or frames.ndim < 2 or not indexes:
            raise ProtocolError(f"{FRAMES!r} must be uint8 [frames, ...] named by {INDEX} columns")
        for name in indexes:
            idx = out[name]
            if idx.dtype.kind not in "iu" or (idx.size and (idx.min() < 0 or idx.max() >= len(frames))):
                raise ProtocolError(f"{name!r} must hold integer indexes below {len(frames)}")
        out[FRAMES] = frames
        return out


class StackPool:
    """Client side: destination buffers for rebuilt stacks, reused once let go.

    A fresh array of megabytes costs a page fault per 4 KiB on its first write, more than
    the copy into it; so a buffer goes out again, but only once nothing outside this pool
    refers to it (the batch it went out in, and every view or tensor of it, was dropped).
    """

    def __init__(self, most: int = 4):
        self.most = most  # kept per shape; a learner holding more batches gets one-offs
        self.buffers: list[np.ndarray] = []

    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """An uninitialized buffer: a pooled one nothing else refers to, else a new one (pooled if room)."""
        same = 0
        for i in range(len(self.buffers)):
            if self.buffers[i].shape == shape and self.buffers[i].dtype == dtype:
                same += 1
                if sys.getrefcount(self.buffers[i]) == 2:  # the list's and the call's own
                    return self.buffers[i]
        buf = np.empty(shape, dtype)
        if same < self.most:
            self.buffers.append(buf)
        return buf


def rebuild(arrays: dict[str, np.ndarray], pool: StackPool | None = None) -> dict[str, np.ndarray]:
    """`arrays` with each `<name>_frame_index` of a unique-frame batch (checked by Unpacker)
    replaced by `<name>`, the uint8 stacks it names. Stacks laid out as runs of consecutive
    frames (the shard's window layout, table.gather_frames) come back as views on the
    received frames, no copy: obs and next_obs of one item then share memory. Others are
    gathered into arrays of their own (from `pool` when given). Either way a torch tensor
    views the result without a copy. Other batches come back as they are."""
    frames = arrays.pop(FRAMES, None)
    if frames is None:
        return arrays
    for name in [k for k in arrays if k.endswith(INDEX)]:
        idx = arrays.pop(name)
        view = _runs(frames, idx)
        if view is None:
            shape = (*idx.shape, *frames.shape[1:])
            out = pool.empty(shape, frames.dtype) if pool is not None else np.empty(shape, frames.dtype)
            # mode="clip": Unpacker checked every index; the default would check them again.
            view = frames.take(idx, axis=0, out=out, mode="clip")
        arrays[name[: -len(INDEX)]] = view
    return arrays


def _runs(frames: np.ndarray, idx: np.ndarray) -> np.ndarray | None:
    """`frames[idx]` as a strided view on `frames`, when every row of `idx` [n, stack] names
    consecutive frames and each row starts the same step after the one before; else None.
    Within bounds by construction: the view's last frame is idx[-1, -1], which Unpacker
    checked names a frame."""
    if idx.ndim != 2 or not idx.size or not frames.flags.c_contiguous:
        return None
    n, k = idx.shape
    first = int(idx[0, 0])
    step = int(idx[1, 0]) - first if n > 1 else k
    if step < 1 or not np.array_equal(idx - first, _run_pattern(n, k, step)):
        return None
    size = frames.strides[0]
    shape = (n, k, *frames.shape[1:])
    return np.ndarray(shape, frames.dtype, frames, first * size, (step * size, size, *frames.strides[1:]))


@functools.lru_cache(maxsize=16)
def _run_pattern(n: int, k: int, step: int) -> np.ndarray:
    """Indexes of n rows of k consecutive frames, `step` apart, from 0."""
    return np.arange(0, n * step, step, dtype=np.int64)[:, None] + np.arange(k, dtype=np.int64)


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
