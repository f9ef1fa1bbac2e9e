"""Broadcast codecs: how a version's float32 blob is turned into the bytes the tree carries.

Sits between the learner's `blob.pack` (encode, once per version) and whoever turns a
version back into arrays (`blob.unpack` in actors and in leaf nodes that fill shared
memory). Cache nodes never decode: they pass the encoded chunks on and check only the
payload digest. Three codecs, chosen by `cache.codec`:

- `raw`: the float32 bytes as they are.
- `bf16`: each float32 rounded to nearest-even bfloat16 (2 bytes). Relative error per
  element <= 2**-8 (8 bits of mantissa kept); 50% of raw.
- `int8delta`: K-level quantization (K <= 256, one byte per element) of the change since
  the newest keyframe. Per tensor, the change d = new - keyframe lies in [lo, hi]; it is
  sent as q = round((d - lo) / s) with s = (hi - lo) / (K - 1), and decoded as
  keyframe + lo + q * s. Absolute error per element <= s / 2 (plus float32 rounding of
  the sum, ~1 ulp of the value). Every `keyframe_every`-th version is a raw keyframe, so
  the error never accumulates (each delta is taken against the exact keyframe, not the
  previous lossy version) and a receiver needs only one base. With keyframe_every = F,
  bytes per version average (1 + (F - 1) / 4) / F of raw: 30% at F = 14, 28% at F = 20.

The manifest carries the codec, the keyframe version (`base`), K and each tensor's
(lo, s); `decoded_digest` is the xxh3 of the decoded float32 blob, which receivers check
after decoding, so a receiver with the wrong base can never load a wrong policy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from canopy.errors import ProtocolError
from canopy.version import Version

CODECS = ("raw", "bf16", "int8delta")
FLOAT = np.dtype("<f4")


def to_bf16(blob: bytes | memoryview) -> bytes:
    """float32 bytes -> bfloat16 bytes, rounding to nearest even."""
    u = np.frombuffer(blob, dtype="<u4")
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16  # uint32 arithmetic wraps only for NaN payloads
    return rounded.astype("<u2").tobytes()


def from_bf16(payload: bytes | memoryview) -> bytes:
    """bfloat16 bytes -> float32 bytes (exact: the dropped mantissa bits come back as zeros)."""
    return (np.frombuffer(payload, dtype="<u2").astype("<u4") << 16).tobytes()


def delta_encode(
    new: np.ndarray, base: np.ndarray, spans: list[tuple[int, int]], levels: int
) -> tuple[bytes, list[tuple[float, float]]]:
    """Quantize new - base per span (tensor) to `levels` levels; returns codes and (lo, step)."""
    codes = np.empty(len(new), dtype=np.uint8)
    params = []
    for start, end in spans:
        d = new[start:end] - base[start:end]
        lo = float(d.min()) if end > start else 0.0
        hi = float(d.max()) if end > start else 0.0
        step = (hi - lo) / (levels - 1) if hi > lo else 1.0
        q = np.rint((d - np.float32(lo)) / np.float32(step))
        codes[start:end] = np.clip(q, 0, levels - 1).astype(np.uint8)
        params.append((lo, step))
    return codes.tobytes(), params


def delta_decode(
    codes: bytes | memoryview,
    base: np.ndarray,
    spans: list[tuple[int, int]],
    params: list[tuple[float, float]],
) -> bytes:
    """keyframe + lo + q * step per span, as float32 bytes; ProtocolError when the sizes do not match."""
    q = np.frombuffer(codes, dtype=np.uint8)
    if len(q) != len(base) or len(params) != len(spans):
        raise ProtocolError(f"int8delta payload of {len(q)} codes does not match a base of {len(base)}")
    out = np.empty(len(base), dtype=FLOAT)
    for (start, end), (lo, step) in zip(spans, params, strict=True):
        # Same float32 operations as the encoder's reconstruction: bit-identical results.
        out[start:end] = base[start:end] + (np.float32(lo) + q[start:end].astype(FLOAT) * np.float32(step))
    return out.tobytes()


def spans_of(layout: list[tuple[str, str, tuple[int, ...], int]]) -> list[tuple[int, int]]:
    """Element ranges of each tensor in the float32 blob; lossy codecs accept float32 only."""
    spans = []
    for name, dtype, shape, offset in layout:
        if dtype != FLOAT.str:
            raise ProtocolError(f"lossy codecs need float32 tensors; {name!r} is {dtype}")
        start = offset // 4
        spans.append((start, start + int(np.prod(shape, dtype=np.int64))))
    return spans


@dataclass
class Encoded:
    """One encoded version: the payload sent, the blob receivers rebuild, and the codec's manifest fields."""

    codec: str
    payload: bytes
    decoded: bytes  # what receivers reconstruct: the digest they check is of this
    base: str = ""
    params: dict = field(default_factory=dict)


class Encoder:
    """Stateful per-learner encoder: remembers the newest keyframe for int8delta.

    Example:
        enc = Encoder("int8delta", levels=256, keyframe_every=16)
        manifest, chunks = blob.pack(state, version, MLP, learner=0, encoder=enc)
    """

    def __init__(self, codec: str = "raw", levels: int = 256, keyframe_every: int = 16):
        if codec not in CODECS:
            raise ValueError(f"unknown codec {codec!r}; expected one of {CODECS}")
        if not 2 <= levels <= 256 or keyframe_every < 1:
            raise ValueError("int8delta needs 2 <= levels <= 256 and keyframe_every >= 1")
        self.codec, self.levels, self.keyframe_every = codec, levels, keyframe_every
        self.keyframe: tuple[Version, np.ndarray] | None = None
        self.since_keyframe = 0

    def encode(self, version: Version, blob: bytes, layout: list) -> Encoded:
        """Encode one blob (int8delta: a raw keyframe every `keyframe_every` versions or on a size change)."""
        if self.codec == "raw":
            return Encoded("raw", blob, blob)
        if self.codec == "bf16":
            payload = to_bf16(blob)
            return Encoded("bf16", payload, from_bf16(payload))
        new = np.frombuffer(blob, dtype=FLOAT)
        if (
            self.keyframe is None
            or self.since_keyframe + 1 >= self.keyframe_every
            or len(self.keyframe[1]) != len(new)
        ):
            self.keyframe, self.since_keyframe = (version, new.copy()), 0
            return Encoded("raw", blob, blob)
        self.since_keyframe += 1
        base_version, base = self.keyframe
        spans = spans_of(layout)
        codes, params = delta_encode(new, base, spans, self.levels)
        decoded = delta_decode(codes, base, spans, params)
        return Encoded(
            "int8delta", codes, decoded, str(base_version), {"levels": self.levels, "ranges": params}
        )
