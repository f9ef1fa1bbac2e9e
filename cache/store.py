"""A cache node's versions: held, arriving and asked for, plus the host's shared-memory ring.

The middle of a node (cache/node.py): the upstream thread (cache/upstream.py) stages each
version here chunk by chunk as it arrives from the parent, checks it and lands it; the
serve thread (cache/serving.py) reads the held versions and the chunks in so far to answer
children. Both threads go through `VersionStore`, whose tables share one lock.

A leaf node with `shm_tag` also writes each version once to the host's shared-memory ring
(cache/shm.py) for actors on its host: a raw version chunk by chunk as the checked chunks
arrive (cut-through into the ring; the slot becomes visible only once the whole payload
digest is checked), a lossy one decoded once it is whole.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import xxhash

from canopy.cache import blob, protocol
from canopy.cache.shm import ShmWriter
from canopy.config import CacheConfig
from canopy.errors import ProtocolError
from canopy.version import Version

MAX_STAGED = 16  # stage times are kept for this many recent versions only: a bounded table


@dataclass
class Entry:
    """A held version: its manifest, the reply messages ready to send, and (raw) its chunks."""

    manifest: blob.Manifest
    messages: list[list]  # the `version` reply (header, then chunks), ready for any child
    raw: list | None = None  # a raw version's chunks: the base of later int8delta versions


@dataclass
class Partial:
    """A version arriving from upstream: the chunks checked so far (upstream appends)."""

    manifest: blob.Manifest
    chunks: list
    shm_slot: int = -1  # raw versions on a leaf: the ring slot the chunks are copied into
    shm_offset: int = 0
    hasher: Any = field(default_factory=xxhash.xxh3_64)  # fed each chunk as it arrives


class VersionStore:
    """Single flight lives here: a version asked of upstream (`in_flight`), arriving
    (`partial`) or held (`versions`) is never fetched again. The three tables share one
    lock: a finished fetch leaves `in_flight` and `partial` in one step, so a child asking
    meanwhile either streams the version or asks for it afresh, never waits on nothing."""

    def __init__(self, cfg: CacheConfig, shm_tag: str, counters: dict) -> None:
        self.cfg, self.shm_tag, self.counters = cfg, shm_tag, counters
        self.lock = threading.Lock()
        self.versions: OrderedDict[Version, Entry] = OrderedDict()  # newest last
        self.partial: dict[Version, Partial] = {}
        self.in_flight: set[Version] = set()  # asked of upstream, not landed or failed yet
        self.shm: ShmWriter | None = None  # replaced (upstream thread) by a larger ring when needed
        self._stages: dict[Version, dict[str, float]] = {}  # unix times per arriving version

    # ---- either thread ------------------------------------------------------------------
    def newest(self) -> Version | None:
        """The newest version held, or None before the first."""
        with self.lock:
            return next(reversed(self.versions), None)

    def entry(self, version: Version) -> Entry | None:
        """What is held of `version`, or None when it is not held."""
        with self.lock:
            return self.versions.get(version)

    def shm_name(self) -> str:
        """The tag of the ring that readers map now, or "" without one."""
        return self.shm.tag if self.shm is not None else ""

    def close(self) -> None:
        """Close (and delete) the shared-memory ring."""
        if self.shm is not None:
            self.shm.close()

    # ---- serve thread -------------------------------------------------------------------
    def lookup(self, version: Version | None) -> tuple[Entry | None, bool]:
        """The held entry, if any, and whether the version is arriving, seen together."""
        with self.lock:
            return (self.versions.get(version) if version else None), version in self.partial

    def arriving(self, version: Version) -> Partial | None:
        """The version's manifest and chunks so far while it arrives, else None."""
        with self.lock:
            return self.partial.get(version)

    def chunks_so_far(self, version: Version) -> list:
        """A copy of the list of chunks of `version` checked so far ([] when not arriving)."""
        with self.lock:
            partial = self.partial.get(version)
            return list(partial.chunks) if partial is not None else []

    def claim(self, version: Version) -> bool:
        """Count `version` in flight; True when nobody had asked for it yet."""
        with self.lock:
            ask = version not in self.in_flight
            self.in_flight.add(version)
            return ask

    # ---- upstream thread ----------------------------------------------------------------
    def claim_newer(self, version: Version) -> bool:
        """Count `version` in flight if it is newer than any held and not asked for yet."""
        newest = self.newest()
        with self.lock:
            if (newest is None or version > newest) and version not in self.in_flight:
                self.in_flight.add(version)
                return True
            return False

    def holds(self, version: Version) -> bool:
        """True once `version` has landed (until it is evicted)."""
        with self.lock:
            return version in self.versions

    def settle(self, version: Version) -> None:
        """The fetch of `version` is over, landed or failed: it may be asked for again."""
        with self.lock:
            self.in_flight.discard(version)
            self.partial.pop(version, None)

    def drop_partial(self, version: Version) -> None:
        """The parent went away mid-transfer: the version stays in flight for the next one."""
        with self.lock:
            self.partial.pop(version, None)

    def stage(self, version: Version, name: str) -> None:
        """Record when `version` first reached stage `name` (the bench's per-stage breakdown)."""
        stages = self._stages.setdefault(version, {})
        stages.setdefault(name, time.time())
        while len(self._stages) > MAX_STAGED:
            del self._stages[next(iter(self._stages))]

    def begin(self, manifest: blob.Manifest) -> None:
        """Manifest in: stage the version's chunks from now on; a leaf reserves a ring slot for a raw one."""
        self.stage(manifest.version, "begun")
        partial = Partial(manifest, [])
        if self.shm_tag and manifest.codec == "raw":
            self._ensure_ring(manifest)
            assert self.shm is not None
            slot = self.shm.reserve()  # the pin grace period passes while chunk 0 downloads
            if slot is None:
                self.counters["shm_skipped_total"] += 1
            else:
                partial.shm_slot = slot
        with self.lock:
            self.partial[manifest.version] = partial

    def append_chunk(self, version: Version, chunk: bytes | memoryview) -> Partial:
        """One more checked chunk, visible to the serve thread from now on."""
        with self.lock:
            partial = self.partial[version]
            partial.chunks.append(chunk)
        return partial

    def digest_chunk(self, manifest: blob.Manifest, partial: Partial, chunk: bytes | memoryview) -> None:
        """Hash the chunk and copy it into the reserved ring slot, after the serve thread was
        told of it: both overlap the next chunk's download, so the whole digest and the
        ring copy are ready when the last chunk is in."""
        partial.hasher.update(chunk)
        if partial.shm_slot >= 0 and self.shm is not None:
            if partial.shm_offset + len(chunk) > manifest.decoded_size:
                self.shm_abort(manifest.version)  # more bytes than the manifest says: refused at the end
            elif self.shm.write(partial.shm_slot, partial.shm_offset, chunk):
                partial.shm_offset += len(chunk)
            else:  # a reader pinned the slot's old version meanwhile: skip the ring this time
                partial.shm_slot = -1
                self.counters["shm_skipped_total"] += 1

    def shm_abort(self, version: Version) -> None:
        """Give back the ring slot an arriving version was being copied into, if any."""
        with self.lock:
            partial = self.partial.get(version)
        if partial is not None and partial.shm_slot >= 0 and self.shm is not None:
            self.shm.abort(partial.shm_slot)
            partial.shm_slot = -1

    def land(self, manifest: blob.Manifest, chunks: list) -> None:
        """Check the whole version and hold it (and put it in the ring); ProtocolError if corrupt."""
        self.stage(manifest.version, "fetched")
        with self.lock:
            partial = self.partial.get(manifest.version)
        fed = (  # the hasher saw exactly these chunks, in this order
            partial is not None
            and len(partial.chunks) == len(chunks)
            and all(a is b for a, b in zip(partial.chunks, chunks, strict=True))
        )
        try:  # never hold a corrupt version
            blob.check_chunks(manifest, chunks, partial.hasher if fed and partial else None)
        except ProtocolError:
            self.shm_abort(manifest.version)
            raise
        self.counters["upstream_fetches_total"] += 1
        self.counters["upstream_bytes_total"] += manifest.size
        messages = protocol.version_messages(manifest, chunks)
        entry = Entry(manifest, messages, chunks if manifest.codec == "raw" else None)
        if partial is not None and partial.shm_slot >= 0 and self.shm is not None:
            self._commit_slot(partial, manifest)
        elif self.shm_tag and (manifest.codec != "raw" or partial is None):
            self._to_shm(entry, chunks)
        with self.lock:
            self.versions[manifest.version] = entry
            self.versions.move_to_end(manifest.version)
            self.versions = OrderedDict(sorted(self.versions.items()))
            self._evict()
            newest = next(reversed(self.versions))
        self.counters["versions_fetched_total"] += 1
        self.counters["policy_version"] = str(newest)
        self.counters["landed_at"] = time.time()  # when the newest fetch completed (bench tiers)
        self.stage(manifest.version, "stored")
        if newest == manifest.version:
            stages = self._stages.get(manifest.version, {})
            self.counters["stages"] = {"version": str(manifest.version), **stages}

    def _commit_slot(self, partial: Partial, manifest: blob.Manifest) -> None:
        assert self.shm is not None
        # Written as it arrived; the payload digest (the decoded one, for raw) was just checked.
        if partial.shm_offset == manifest.decoded_size:
            self.shm.commit(partial.shm_slot, manifest)
        else:  # cannot happen for a checked version; never show a partial one
            self.shm.abort(partial.shm_slot)
            self.counters["shm_skipped_total"] += 1
        partial.shm_slot = -1

    def _evict(self) -> None:
        """Keep the newest `keep_versions`, plus the keyframe the newest int8delta needs."""
        bases = {e.manifest.base for e in self.versions.values() if e.manifest.base}
        while len(self.versions) > self.cfg.keep_versions:
            for v in self.versions:
                if str(v) not in bases:
                    del self.versions[v]
                    break
            else:
                break

    def _to_shm(self, entry: Entry, chunks: list) -> None:
        m = entry.manifest
        data: list | bytes = chunks  # raw and checked: straight into the slot, no joined copy
        if m.codec != "raw":
            base = None
            if m.codec == "int8delta":
                with self.lock:
                    keyframe = self.versions.get(Version.parse(m.base))
                base = b"".join(keyframe.raw) if keyframe is not None and keyframe.raw else None
            try:
                data = blob.decode_payload(m, b"".join(chunks), base)
            except ProtocolError:
                self.counters["shm_skipped_total"] += 1  # children fetch it over the socket instead
                return
        self._ensure_ring(m)
        assert self.shm is not None
        if not self.shm.publish(m, data):
            self.counters["shm_skipped_total"] += 1

    def _ensure_ring(self, m: blob.Manifest) -> None:
        if self.shm is None or self.shm.capacity < m.decoded_size:
            if self.shm is not None:
                self.shm.close()
            self.shm = ShmWriter(f"{self.shm_tag}-{m.version}", m.decoded_size, self.cfg.shm_slots)
