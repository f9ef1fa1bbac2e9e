"""The ZeroMQ wire format: one msgpack header frame, then one raw frame per numpy array.

Arrays travel as their own frames so large buffers are sent without copying
(`send_multipart(copy=False)`) and decoded with `np.frombuffer`. The header names each
array's dtype and shape; `decode` checks every frame against them and against size limits
and raises ProtocolError on anything unexpected. No pickle anywhere.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import zmq

from canopy.errors import ProtocolError

MAX_HEADER_BYTES = 64 * 1024
MAX_ARRAYS = 1100  # room for a model of 1024 chunks
ALLOWED_DTYPES = frozenset(
    np.dtype(d).str for d in ("u1", "i1", "u2", "i2", "i4", "u4", "i8", "u8", "f2", "f4", "f8", "?")
)


@dataclass
class Message:
    """A decoded message: the header map and its arrays by name."""

    header: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def op(self) -> str:
        """The request or reply kind the header names."""
        return self.header["op"]


def encode(header: Mapping[str, Any], arrays: Mapping[str, np.ndarray] | None = None) -> list:
    """Frames for `send_multipart`: the msgpack header, then each array's raw bytes."""
    arrays = arrays or {}
    # np.ascontiguousarray would turn a 0-d array into shape (1,); copy only when needed.
    contiguous = [a if a.flags.c_contiguous else a.copy(order="C") for a in map(np.asarray, arrays.values())]
    head = dict(header)
    head["arrays"] = [[name, a.dtype.str, list(a.shape)] for name, a in zip(arrays, contiguous, strict=True)]
    return [msgpack.packb(head), *contiguous]


def decode(frames: Sequence[zmq.Frame | bytes], max_frame_bytes: int) -> Message:
    """Check and decode frames from `encode`; arrays are read-only views on the frames.

    Raises ProtocolError when the header is not a msgpack map with a string `op`, when the
    frame count, a dtype, a shape or a size does not match, or when a frame is too large.
    """
    if not frames:
        raise ProtocolError("empty message")
    raw = _buffer(frames[0])
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(raw, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"header is not valid msgpack: {type(exc).__name__}") from None
    if not isinstance(header, dict) or not isinstance(header.get("op"), str):
        raise ProtocolError("header must be a map with a string 'op'")
    specs = header.pop("arrays", [])
    if not isinstance(specs, list) or len(specs) > MAX_ARRAYS:
        raise ProtocolError(f"'arrays' must be a list of at most {MAX_ARRAYS} specs")
    if len(specs) != len(frames) - 1:
        raise ProtocolError(f"header names {len(specs)} arrays but {len(frames) - 1} frames came")
    arrays = {}
    for spec, frame in zip(specs, frames[1:], strict=True):
        name, dtype, shape = _check_spec(spec)
        buf = _buffer(frame)
        if len(buf) > max_frame_bytes:
            raise ProtocolError(f"array {name!r} of {len(buf)} bytes exceeds {max_frame_bytes}")
        expected = math.prod(shape) * dtype.itemsize  # Python ints: no silent overflow
        if len(buf) != expected:
            raise ProtocolError(
                f"array {name!r} has {len(buf)} bytes, expected {expected} for {dtype} {shape}"
            )
        arrays[name] = np.frombuffer(buf, dtype=dtype).reshape(shape)
    return Message(header, arrays)


def _buffer(frame: Any) -> memoryview:
    """A flat byte view of a received zmq.Frame, bytes, or any buffer (as `encode` returns)."""
    view = frame.buffer if isinstance(frame, zmq.Frame) else memoryview(frame)
    return view.cast("B") if view.nbytes else memoryview(b"")  # cast() refuses zero-size shapes


def _check_spec(spec: Any) -> tuple[str, np.dtype, tuple[int, ...]]:
    if not (isinstance(spec, list) and len(spec) == 3):
        raise ProtocolError("array spec must be [name, dtype, shape]")
    name, dtype, shape = spec
    if not isinstance(name, str) or len(name) > 64:
        raise ProtocolError("array name must be a short string")
    if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES:
        raise ProtocolError(f"array {name!r}: dtype {dtype!r} is not allowed")
    if (
        not isinstance(shape, list)
        or len(shape) > 8
        or not all(isinstance(d, int) and 0 <= d < 2**31 for d in shape)
    ):
        raise ProtocolError(f"array {name!r}: shape must be a list of at most 8 sizes")
    return name, np.dtype(dtype), tuple(shape)


def peek_req(frame: zmq.Frame | bytes) -> int | None:
    """The request id of a header we otherwise rejected, so the error reply can name it."""
    raw = _buffer(frame)
    if len(raw) > MAX_HEADER_BYTES:
        return None
    try:
        req = msgpack.unpackb(raw).get("req")
    except Exception:  # garbage header: the reply goes out without a request id
        return None
    return req if isinstance(req, int) else None


def error_reply(code: str, message: str, **extra: Any) -> list:
    """An error frame list; `code` is machine-readable, `message` is for people."""
    return encode({"op": "error", "code": code, "message": message, **extra})
