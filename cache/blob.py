"""Policy versions as immutable blobs: raw tensor bytes in chunks plus a manifest.

The learner writes a version to the Redis root once: chunks under
`model:<v>:chunk:<i>`, then the manifest hash `model:<v>:manifest`, then moves
`model:latest` and publishes the id on `model:notify`. Everything read back (from Redis or
a cache node) is checked against the manifest: sizes, layout, and the xxh3 digest of the
whole blob. No pickle: tensors are plain little-endian arrays named in the layout.

With a lossy codec (cache/codecs.py) the chunks hold the encoded payload: `size` and
`digest` describe the payload (what nodes check before passing it on), `layout`,
`decoded_digest` and the codec's `base`/`params` describe the float32 blob that receivers
rebuild and check before any policy sees it.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis
import xxhash

from canopy.cache import codecs, ledger
from canopy.errors import ProtocolError
from canopy.keys import Keys
from canopy.version import Version

CHUNK_BYTES = 1 << 20
MAX_BLOB_BYTES = 1 << 30
MAX_CHUNKS = 1024
ALLOWED_DTYPES = frozenset({"<f4", "<f2", "<i8", "<i4", "|u1"})


@dataclass(frozen=True)
class Manifest:
    """A version's description: payload size and digests, tensor layout, codec and lineage."""

    version: Version
    size: int
    digest: str
    chunks: int
    layout: list[tuple[str, str, tuple[int, ...], int]]  # name, dtype, shape, byte offset
    arch: str
    codec: str = "raw"
    learner: int = 0
    published_at: float = 0.0
    base: str = ""  # int8delta: the keyframe version the delta is taken against
    params: str = ""  # codec parameters as JSON (int8delta: levels, per-tensor lo/step)
    decoded_digest: str = ""  # xxh3 of the decoded float32 blob; equals digest for raw
    parent: str = ""  # the version this learner published before this one ("" if none)
    chunk_digests: tuple[str, ...] = ()  # xxh3 of each payload chunk: nodes check before forwarding

    @property
    def decoded_size(self) -> int:
        """Bytes of the decoded blob: where the last tensor of the layout ends."""
        _name, dtype, shape, offset = self.layout[-1]
        return offset + math.prod(shape) * np.dtype(dtype).itemsize

    def to_fields(self) -> dict[str, str]:
        """The manifest as a flat string hash, as Redis and the wire carry it (`from_fields` reads it)."""
        return {
            "version": str(self.version),
            "epoch": str(self.version.epoch),
            "step": str(self.version.step),
            "size": str(self.size),
            "digest": self.digest,
            "chunks": str(self.chunks),
            "layout": json.dumps([[n, d, list(s), o] for n, d, s, o in self.layout]),
            "arch": self.arch,
            "codec": self.codec,
            "learner": str(self.learner),
            "published_at": f"{self.published_at:.6f}",
            "base": self.base,
            "params": self.params,
            "decoded_digest": self.decoded_digest or self.digest,
            "parent": self.parent,
            "chunk_digests": json.dumps(list(self.chunk_digests)),
        }

    @classmethod
    def from_fields(cls, fields: dict[Any, Any]) -> Manifest:
        """Parse and check a manifest read from Redis or a socket; raises ProtocolError."""
        f = {_text(k): _text(v) for k, v in fields.items()}
        try:
            layout = [
                (str(n), str(d), tuple(int(x) for x in s), int(o)) for n, d, s, o in json.loads(f["layout"])
            ]
            m = cls(
                version=Version.parse(f["version"]),
                size=int(f["size"]),
                digest=f["digest"],
                chunks=int(f["chunks"]),
                layout=layout,
                arch=f["arch"],
                codec=f["codec"],
                learner=int(f["learner"]),
                published_at=float(f["published_at"]),
                base=f.get("base", ""),
                params=f.get("params", ""),
                decoded_digest=f.get("decoded_digest") or f["digest"],
                parent=f.get("parent", ""),
                chunk_digests=tuple(json.loads(f.get("chunk_digests") or "[]")),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise ProtocolError(f"malformed model manifest: {type(exc).__name__} {exc}") from None
        if m.codec not in codecs.CODECS:
            raise ProtocolError(f"unknown model codec {m.codec!r}")
        if not 0 < m.size <= MAX_BLOB_BYTES or not 0 < m.chunks <= MAX_CHUNKS or not m.layout:
            raise ProtocolError(f"model manifest sizes out of range: {m.size} bytes, {m.chunks} chunks")
        end = 0
        for name, dtype, shape, offset in m.layout:
            if dtype not in ALLOWED_DTYPES or offset != end:
                raise ProtocolError(f"model layout entry {name!r} is inconsistent")
            end = offset + math.prod(shape) * np.dtype(dtype).itemsize
        ratio = {"raw": 1, "bf16": 2, "int8delta": 4}[m.codec]
        if end != m.size * ratio:
            raise ProtocolError(f"model layout covers {end} bytes, {m.codec} payload is {m.size}")
        if m.chunk_digests and (
            len(m.chunk_digests) != m.chunks
            or not all(isinstance(d, str) and len(d) == 16 for d in m.chunk_digests)
        ):
            raise ProtocolError(f"model {m.version}: chunk digests do not match its {m.chunks} chunks")
        if m.codec != "raw":
            codecs.spans_of(m.layout)  # lossy codecs carry float32 tensors only
        if m.codec == "int8delta":
            Version.parse(m.base)
            _delta_params(m)
        return m


_last_packed: dict[int, Version] = {}  # learner id -> its previous version (ledger parent)


def pack(
    state: dict[str, np.ndarray],
    version: Version,
    arch: str,
    learner: int,
    encoder: codecs.Encoder | None = None,
) -> tuple[Manifest, list[bytes]]:
    """Serialize named arrays into a manifest and chunks of at most CHUNK_BYTES.

    `encoder` picks the broadcast codec (cache/codecs.py); without one the blob is raw.
    """
    layout, parts, offset = [], [], 0
    for name, array in state.items():
        a = np.ascontiguousarray(array)
        layout.append((name, a.dtype.str, tuple(a.shape), offset))
        parts.append(a.tobytes())
        offset += a.nbytes
    blob = b"".join(parts)
    enc = (encoder or codecs.Encoder("raw")).encode(version, blob, layout)
    payload = enc.payload
    chunks = [payload[i : i + CHUNK_BYTES] for i in range(0, len(payload), CHUNK_BYTES)]
    digest = xxhash.xxh3_64_hexdigest(payload)
    previous = _last_packed.get(learner)
    _last_packed[learner] = version
    manifest = Manifest(
        version=version,
        size=len(payload),
        digest=digest,
        chunks=len(chunks),
        layout=layout,
        arch=arch,
        codec=enc.codec,
        learner=learner,
        published_at=time.time(),
        base=enc.base,
        params=json.dumps(enc.params) if enc.params else "",
        decoded_digest=digest if enc.codec == "raw" else xxhash.xxh3_64_hexdigest(enc.decoded),
        parent=str(previous) if previous is not None and previous < version else "",
        chunk_digests=tuple(xxhash.xxh3_64_hexdigest(c) for c in chunks),
    )
    return manifest, chunks


def check_chunks(manifest: Manifest, chunks: list[bytes | memoryview], hasher: Any = None) -> None:
    """Check chunk count, total size and the payload digest without joining the chunks.

    `hasher`: an xxh3_64 state already fed exactly these chunks in order (a node hashes each
    chunk as it arrives, so the check at the end costs nothing more)."""
    if len(chunks) != manifest.chunks:
        raise ProtocolError(f"model {manifest.version}: {len(chunks)} chunks, expected {manifest.chunks}")
    size = sum(len(c) for c in chunks)
    if size != manifest.size:
        raise ProtocolError(f"model {manifest.version}: {size} bytes, expected {manifest.size}")
    digest = hasher
    if digest is None:
        digest = xxhash.xxh3_64()
        for c in chunks:
            digest.update(c)
    if digest.hexdigest() != manifest.digest:
        raise ProtocolError(f"model {manifest.version}: digest mismatch, refusing to load it")


def check_payload(manifest: Manifest, chunks: list[bytes | memoryview]) -> bytes:
    """The payload joined, after checking chunk count, total size and payload digest."""
    check_chunks(manifest, chunks)
    return b"".join(chunks)


def check_chunk(manifest: Manifest, i: int, chunk: bytes | memoryview) -> None:
    """Refuse chunk i before it is passed on (cut-through); the whole digest is checked at the end."""
    if not 0 <= i < manifest.chunks or len(chunk) > CHUNK_BYTES:
        raise ProtocolError(f"model {manifest.version}: chunk {i} out of range or over {CHUNK_BYTES} bytes")
    if manifest.chunk_digests and xxhash.xxh3_64_hexdigest(chunk) != manifest.chunk_digests[i]:
        raise ProtocolError(f"model {manifest.version}: chunk {i} digest mismatch, refusing to pass it on")


def decode(manifest: Manifest, chunks: list[bytes | memoryview], base: bytes | None = None) -> bytes:
    """The checked float32 blob: payload digest, decoding, then the decoded digest.

    `base` is the decoded blob of the keyframe `manifest.base` (int8delta only).
    """
    return decode_payload(manifest, check_payload(manifest, chunks), base)


def decode_payload(manifest: Manifest, payload: bytes, base: bytes | None = None) -> bytes:
    """As `decode`, for a payload whose digest the caller has checked already."""
    if manifest.codec == "raw":
        return payload
    if manifest.codec == "bf16":
        blob = codecs.from_bf16(payload)
    else:
        if base is None or len(base) != manifest.decoded_size:
            raise ProtocolError(f"model {manifest.version}: int8delta needs keyframe {manifest.base}")
        _levels, ranges = _delta_params(manifest)
        spans = codecs.spans_of(manifest.layout)
        blob = codecs.delta_decode(payload, np.frombuffer(base, dtype=codecs.FLOAT), spans, ranges)
    if xxhash.xxh3_64_hexdigest(blob) != manifest.decoded_digest:
        raise ProtocolError(f"model {manifest.version}: decoded digest mismatch, refusing to load it")
    return blob


def arrays_of(manifest: Manifest, blob: bytes | memoryview) -> dict[str, np.ndarray]:
    """Named read-only array views on a decoded blob (no copy)."""
    return {
        name: np.frombuffer(blob, dtype=dtype, count=math.prod(shape), offset=offset).reshape(shape)
        for name, dtype, shape, offset in manifest.layout
    }


def unpack(
    manifest: Manifest, chunks: list[bytes | memoryview], base: bytes | None = None
) -> dict[str, np.ndarray]:
    """Rebuild the named arrays, checking chunk count, total size and digests."""
    return arrays_of(manifest, decode(manifest, chunks, base))


def write(r: redis.Redis, keys: Keys, manifest: Manifest, chunks: list[bytes]) -> None:
    """Publish a version to the Redis root: chunks, manifest, ledger, latest pointer, notify."""
    v = manifest.version
    pipe = r.pipeline(transaction=True)
    for i, chunk in enumerate(chunks):
        pipe.set(keys.model_chunk(v, i), chunk)
    pipe.hset(keys.model_manifest(v), mapping=manifest.to_fields())
    pipe.hset(keys.ledger_version(v), mapping=ledger.entry(manifest))
    pipe.zadd(keys.ledger_index, {str(v): v.packed()})
    pipe.set(keys.model_latest, str(v))
    pipe.publish(keys.model_notify, str(v))
    pipe.execute()


def delete(r: redis.Redis, keys: Keys, manifest: Manifest) -> None:
    """Drop an old version's blob (its ledger entry stays)."""
    v = manifest.version
    r.delete(keys.model_manifest(v), *(keys.model_chunk(v, i) for i in range(manifest.chunks)))


def discard(r: redis.Redis, keys: Keys, versions: list[Version]) -> None:
    """Drop whatever is left of these versions' blobs, however many chunks each manifest names
    (a version already trimmed has no manifest: nothing to do)."""
    pipe = r.pipeline(transaction=False)
    for v in versions:
        pipe.hget(keys.model_manifest(v), "chunks")
    doomed = []
    for v, raw in zip(versions, pipe.execute(), strict=True):
        if raw is None:
            continue
        doomed.append(keys.model_manifest(v))
        n = int(raw) if raw.isdigit() else 0  # a bad count: the chunks are not ours to guess
        doomed += [keys.model_chunk(v, i) for i in range(min(n, MAX_CHUNKS))]
    if doomed:
        r.delete(*doomed)


def read_manifest(r: redis.Redis, keys: Keys, version: Version) -> Manifest:
    """A version's checked manifest from Redis; raises ProtocolError if absent or bad."""
    fields = r.hgetall(keys.model_manifest(version))
    if not fields:
        raise ProtocolError(f"model {version} is not in Redis (expired or never published)")
    manifest = Manifest.from_fields(fields)
    if manifest.version != version:
        raise ProtocolError(f"manifest under {version} names {manifest.version}")
    return manifest


def read(r: redis.Redis, keys: Keys, version: Version) -> tuple[Manifest, list[bytes]]:
    """Fetch a version's manifest and chunks from Redis; raises ProtocolError if absent or bad."""
    manifest = read_manifest(r, keys, version)
    chunks = r.mget([keys.model_chunk(version, i) for i in range(manifest.chunks)])
    if any(c is None for c in chunks):
        raise ProtocolError(f"model {version} is missing chunks in Redis")
    return manifest, chunks


def pin(r: redis.Redis, keys: Keys, state: dict[str, np.ndarray], manifest: Manifest, record: dict) -> None:
    """Copy a version into the pinned slot of the best confirmed version, with its record.

    The copy is raw (whatever codec the broadcast used) and lives outside `model:*`, so the
    learner's trimming of old versions never reaches it; one transaction replaces the
    previous pinned version, record included, so a reader never sees a record whose blob
    is another version's.
    """
    pinned, chunks = pack(state, manifest.version, manifest.arch, manifest.learner)
    old = r.hget(keys.best_manifest, "chunks")
    stale = range(len(chunks), int(old) if old and old.isdigit() else 0)
    pipe = r.pipeline(transaction=True)
    if stale:
        pipe.delete(*(keys.best_chunk(i) for i in stale))
    for i, chunk in enumerate(chunks):
        pipe.set(keys.best_chunk(i), chunk)
    pipe.delete(keys.best_manifest)
    pipe.hset(keys.best_manifest, mapping=pinned.to_fields())
    pipe.delete(keys.best)
    pipe.hset(keys.best, mapping={k: str(v) for k, v in {**record, "version": manifest.version}.items()})
    pipe.execute()


def read_pinned(r: redis.Redis, keys: Keys) -> tuple[Manifest, list[bytes], dict[str, str]]:
    """The best confirmed version's manifest, chunks and record; ProtocolError if none or bad."""
    for _ in range(3):  # the evaluator may pin a newer best between our reads: read again
        pipe = r.pipeline(transaction=True)
        pipe.hgetall(keys.best)
        pipe.hgetall(keys.best_manifest)
        raw_record, fields = pipe.execute()
        if not raw_record or not fields:
            raise ProtocolError("no version has been confirmed by the evaluator yet")
        manifest = Manifest.from_fields(fields)
        record = {_text(k): _text(v) for k, v in raw_record.items()}
        if record.get("version") != str(manifest.version):
            raise ProtocolError(
                f"best record names {record.get('version')}, pinned blob is {manifest.version}"
            )
        chunks = r.mget([keys.best_chunk(i) for i in range(manifest.chunks)])
        if _text(r.hget(keys.best, "version") or b"") != record["version"]:
            continue
        if any(c is None for c in chunks):
            raise ProtocolError(f"pinned version {manifest.version} is missing chunks in Redis")
        return manifest, chunks, record
    raise ProtocolError("the best version kept changing while it was read: try again")


def _delta_params(m: Manifest) -> tuple[int, list[tuple[float, float]]]:
    try:
        p = json.loads(m.params)
        levels = int(p["levels"])
        ranges = [(float(lo), float(step)) for lo, step in p["ranges"]]
    except (KeyError, ValueError, TypeError) as exc:
        raise ProtocolError(f"int8delta params are malformed: {type(exc).__name__}") from None
    if (
        not 2 <= levels <= 256
        or len(ranges) != len(m.layout)
        or not all(np.isfinite(lo) and np.isfinite(s) and s > 0 for lo, s in ranges)
    ):
        raise ProtocolError("int8delta params out of range")
    return levels, ranges


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
