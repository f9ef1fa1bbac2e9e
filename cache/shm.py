"""Host-local delivery: one shared-memory copy of each version per host, read-only for actors.

The last hop of the tree. A leaf cache node decodes each version once, checks its
decoded digest, and writes it into one slot of a ring of `slots` buffers in /dev/shm;
actors on the same host map the data file read-only and build their policy on views of
it, so a host holds one copy of the weights whatever the number of actors, and only
notifications cross sockets.

Never tearing the copy in use: each reader owns a pair of pin cells in a small separate
file (the one writable part): the version it acts with and the one it is about to take.
The writer only overwrites a slot whose version nobody pins, and it does so in this order:
mark the slot invalid, wait PIN_GRACE_S, re-check the pins, and only then write. A reader
pins first and then checks that the slot still holds its version. Whichever comes first,
the other side sees it: the grace period covers store-buffer delay, as Python offers no
memory fence. When every other slot is pinned the writer skips the version (counted) and
readers fetch it over the socket instead. A version can also be written as it arrives
(`reserve`, then `write` per chunk, then `commit`): the slot is invalid all along and only
`commit` makes it visible, so the copy overlaps the download and adds nothing after it.

Digests are checked once per host, by the node, not by each actor: the node checks the
payload (and decoded) digest before `commit`, and `commit` stores the xxh3-64 it checked in
the slot header next to the version. A reader takes a slot only when that stored digest is
the one its manifest names. That is enough because the ring is host-local and written only
by the node: the data file is created 0600 by the node's user and every reader maps it
read-only (PROT_READ), so no actor can change a byte of it, and the version field (set last
by `commit`, cleared first by `reserve`) says the bytes under it are whole. Hashing the same
8 MiB again in each of 1000 actors would cost seconds of CPU per version and catch nothing
the node's check did not. Readers in one process share the mapping and the parsed views of
each slot (`_Ring`), so taking a version costs an actor a pin and a dictionary lookup.
"""

from __future__ import annotations

import functools
import json
import mmap
import os
import threading
import time
from pathlib import Path

import numpy as np

from canopy.cache import blob
from canopy.errors import ProtocolError
from canopy.version import Version

SHM_DIR = Path("/dev/shm")
MAGIC = 0x43414E4F50590002
HEADER = 4096  # magic, slots, capacity, current slot; then per slot: version, size, meta length, digest
FIELDS = 4  # int64 header fields per slot
META_BYTES = 64 * 1024
PIN_GRACE_S = 0.001
MAX_READERS = 8192


def _align(n: int) -> int:
    return (n + 4095) // 4096 * 4096


class ShmWriter:
    """The leaf node's side. Example:
    w = ShmWriter("run-node3", capacity=manifest.decoded_size)
    w.publish(manifest, decoded_blob)  # False if every free slot is pinned
    """

    def __init__(self, tag: str, capacity: int, slots: int = 3, max_readers: int = MAX_READERS):
        self.tag, self.capacity, self.slots = tag, _align(capacity), slots
        self.data_path = SHM_DIR / f"canopy-{tag}.data"
        self.pins_path = SHM_DIR / f"canopy-{tag}.pins"
        self.meta0 = HEADER
        self.data0 = HEADER + slots * META_BYTES
        size = self.data0 + slots * self.capacity
        self._data_map = _map(self.data_path, size, create=True)
        self._pins_map = _map(self.pins_path, max_readers * 16, create=True)
        self.head = np.frombuffer(self._data_map, dtype=np.int64, count=HEADER // 8)
        self.pins = np.frombuffer(self._pins_map, dtype=np.int64).reshape(max_readers, 2)
        if 4 + FIELDS * slots > HEADER // 8:
            raise ValueError(f"at most {(HEADER // 8 - 4) // FIELDS} slots")
        self.head[1:4] = (slots, self.capacity, -1)
        self.head[0] = MAGIC
        self.next_reader = 0
        self.skipped_total = 0
        self._reserved: tuple[int, int, float] | None = None  # slot, version it held, grace end

    def slot_version(self, i: int) -> int:
        """The packed version slot i holds (0: none, or being rewritten)."""
        return int(self.head[4 + FIELDS * i])

    def take_reader(self) -> int | None:
        """A pin-cell index for a new reader, or None when every cell is taken."""
        if self.next_reader >= len(self.pins):
            return None
        self.next_reader += 1
        return self.next_reader - 1

    def publish(self, manifest: blob.Manifest, decoded: bytes | memoryview | list) -> bool:
        """Write a checked, decoded version (one buffer, or its chunks in order) into a free
        slot and make it current."""
        parts = decoded if isinstance(decoded, list) else [decoded]
        size = sum(len(p) for p in parts)
        if size > self.capacity:
            raise ValueError(f"version of {size} bytes exceeds the slot capacity {self.capacity}")
        slot = self.reserve()
        if slot is None:
            return False
        offset = 0
        for p in parts:
            if not self.write(slot, offset, p):
                return False
            offset += len(p)
        self.commit(slot, manifest)
        return True

    def reserve(self) -> int | None:
        """Take a free slot for the next version and mark it invalid; None (counted as a
        skip) when every slot but the current one is pinned. Write it with `write`, then
        `commit` it (or `abort`)."""
        current = int(self.head[3])
        order = sorted((i for i in range(self.slots) if i != current), key=self.slot_version)
        for i in order:
            old = self.slot_version(i)
            if old and (self.pins == old).any():
                continue
            self.head[4 + FIELDS * i] = 0  # invalid: readers arriving from now on see no version here
            self._reserved = (i, old, time.monotonic() + PIN_GRACE_S)
            return i
        self.skipped_total += 1
        return None

    def write(self, slot: int, offset: int, data: bytes | memoryview) -> bool:
        """Copy part of the version into the reserved slot. The first write waits out the
        pin grace period (usually spent downloading already) and re-checks the pins: False
        (counted as a skip, slot given back) when a reader pinned the old version meanwhile."""
        if self._reserved is not None:
            i, old, ready = self._reserved
            if i != slot:
                raise ValueError(f"slot {slot} is not the reserved one")
            wait = ready - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            if old and (self.pins == old).any():
                self.head[4 + FIELDS * i] = old  # a reader pinned it meanwhile: leave that slot alone
                self._reserved = None
                self.skipped_total += 1
                return False
            self._reserved = None
        if offset + len(data) > self.capacity:
            raise ValueError(f"write past the slot capacity {self.capacity}")
        start = self.data0 + slot * self.capacity + offset
        self._data_map[start : start + len(data)] = data
        return True

    def commit(self, slot: int, manifest: blob.Manifest) -> None:
        """Make the written slot current. The caller has checked the bytes against the
        manifest's decoded digest, which goes into the header beside the version."""
        if self._reserved is not None and not self.write(slot, 0, b""):
            raise ValueError(f"slot {slot} was taken back: a reader pinned its old version")
        meta = json.dumps(manifest.to_fields()).encode()
        if len(meta) > META_BYTES:
            raise ValueError(f"manifest of {len(meta)} bytes exceeds {META_BYTES}")
        m0 = self.meta0 + slot * META_BYTES
        self._data_map[m0 : m0 + len(meta)] = meta
        h = 4 + FIELDS * slot
        self.head[h + 1] = manifest.decoded_size
        self.head[h + 2] = len(meta)
        self.head[h + 3] = digest_int(manifest.decoded_digest)
        self.head[h] = manifest.version.packed()  # last: the slot is whole from here on
        self.head[3] = slot

    def abort(self, slot: int) -> None:
        """Give a reserved or half-written slot back; it stays invalid until reused."""
        self._reserved = None
        self.head[4 + FIELDS * slot] = 0

    def close(self) -> None:
        """Unmap the ring and delete its files (readers keep their own mappings)."""
        del self.head, self.pins
        self._data_map.close()
        self._pins_map.close()
        for p in (self.data_path, self.pins_path):
            p.unlink(missing_ok=True)


class _Ring:
    """One process's mapping of a ring, shared by all its readers, with the views of each
    slot parsed once per version (the first reader to take it pays, the others look it up)."""

    def __init__(self, tag: str):
        self.tag = tag
        fd = os.open(SHM_DIR / f"canopy-{tag}.data", os.O_RDONLY)
        try:
            self.data_map = mmap.mmap(fd, 0, prot=mmap.PROT_READ)  # read-only: actors cannot corrupt it
            self.inode = os.fstat(fd).st_ino
        finally:
            os.close(fd)
        self.pins_map = _map(SHM_DIR / f"canopy-{tag}.pins", 0, create=False)
        self.head = np.frombuffer(self.data_map, dtype=np.int64, count=HEADER // 8)
        if int(self.head[0]) != MAGIC:
            raise ProtocolError(f"shared memory {tag} is not a canopy version ring")
        self.slots, self.capacity = int(self.head[1]), int(self.head[2])
        if not 0 < self.slots <= (HEADER // 8 - 4) // FIELDS:
            raise ProtocolError(f"shared memory {tag}: {self.slots} slots")
        self.pins = np.frombuffer(self.pins_map, dtype=np.int64).reshape(-1, 2)
        self.data0 = HEADER + self.slots * META_BYTES
        self.readers = 0
        self.views: dict[tuple[int, int], tuple[blob.Manifest, dict[str, np.ndarray]]] = {}

    def slot_of(self, packed: int) -> int:
        for i in range(self.slots):
            if int(self.head[4 + FIELDS * i]) == packed:
                return i
        return -1

    def views_of(self, i: int, packed: int) -> tuple[blob.Manifest, dict[str, np.ndarray]]:
        """The manifest and array views of slot i holding `packed` (pinned by the caller)."""
        got = self.views.get((i, packed))
        if got is not None:
            return got
        with _lock:  # readers of one process may live on several threads (ModelClients)
            got = self.views.get((i, packed))
            return got if got is not None else self._parse(i, packed)

    def _parse(self, i: int, packed: int) -> tuple[blob.Manifest, dict[str, np.ndarray]]:
        h = 4 + FIELDS * i
        m0 = HEADER + i * META_BYTES
        manifest = _manifest(bytes(self.data_map[m0 : m0 + int(self.head[h + 2])]))
        verified = int(self.head[h + 3])  # the digest the node checked before committing
        if manifest.version.packed() != packed or digest_int(manifest.decoded_digest) != verified:
            raise ProtocolError(f"shared memory {self.tag}: slot {i} does not hold the version it names")
        start = self.data0 + i * self.capacity
        view = memoryview(self.data_map)[start : start + int(self.head[h + 1])]
        got = (manifest, blob.arrays_of(manifest, view))
        for key in [k for k in self.views if k[0] == i]:  # the slot held an older version before
            del self.views[key]
        self.views[(i, packed)] = got
        return got


_rings: dict[str, _Ring] = {}
_lock = threading.Lock()  # guards _rings, each ring's reader count and views


def _ring(tag: str) -> _Ring:
    with _lock:
        ring = _ring_locked(tag)
        ring.readers += 1
        return ring


def _ring_locked(tag: str) -> _Ring:
    ring = _rings.get(tag)
    if ring is not None:
        try:  # a node restarted under the same tag made a new file: map that one
            if os.stat(SHM_DIR / f"canopy-{tag}.data").st_ino == ring.inode:
                return ring
        except FileNotFoundError:
            pass
        del _rings[tag]
    ring = _rings[tag] = _Ring(tag)
    return ring


class ShmReader:
    """An actor's side. Example:
    r = ShmReader("run-node3", reader=17)
    got = r.take(version)      # (Manifest, {name: read-only view}) or None
    r.acting(version)          # the caller now acts with it: keep it from being overwritten

    Readers of one ring in one process share its mapping and parsed views (`_Ring`); each
    owns its pair of pin cells.
    """

    def __init__(self, tag: str, reader: int):
        self.tag, self.reader = tag, reader
        if reader < 0:
            raise ProtocolError(f"reader index {reader} out of range")
        self.ring = _ring(tag)
        if reader >= len(self.ring.pins):
            self._release()
            raise ProtocolError(f"reader index {reader} out of range")
        self.pins = self.ring.pins
        self.slots, self.capacity = self.ring.slots, self.ring.capacity

    def take(self, version: Version) -> tuple[blob.Manifest, dict[str, np.ndarray]] | None:
        """Pin `version`, return its manifest and read-only views; None (pin cleared) when no slot has it."""
        ring, packed = self.ring, version.packed()
        i = ring.slot_of(packed)
        if i >= 0:
            self.pins[self.reader, 1] = packed
            if int(ring.head[4 + FIELDS * i]) == packed:  # else the writer got there first
                return ring.views_of(i, packed)
        self.pins[self.reader, 1] = 0
        return None

    def acting(self, version: Version) -> None:
        """Pin `version` as the one acted with: the writer leaves its slot alone."""
        self.pins[self.reader, 0] = version.packed()

    def close(self) -> None:
        """Clear this reader's pins and let go of the ring."""
        self.pins[self.reader] = 0
        self._release()

    def _release(self) -> None:
        with _lock:
            self.ring.readers -= 1
            if self.ring.readers == 0 and _rings.get(self.tag) is self.ring:
                del _rings[self.tag]  # the maps stay alive with any views a policy still holds


def digest_int(hexdigest: str) -> int:
    """An xxh3-64 hex digest as the signed int64 the slot header stores."""
    try:
        return int.from_bytes(int(hexdigest, 16).to_bytes(8, "big"), "big", signed=True)
    except (ValueError, OverflowError):
        raise ProtocolError(f"{hexdigest!r} is not an xxh3-64 digest") from None


@functools.lru_cache(maxsize=64)
def _manifest(meta: bytes) -> blob.Manifest:
    """Parse and check a slot's manifest once per process, however many readers take it."""
    try:
        return blob.Manifest.from_fields(json.loads(meta))
    except ValueError:
        raise ProtocolError("shared-memory slot holds a malformed manifest") from None


def _map(path: Path, size: int, create: bool) -> mmap.mmap:
    flags = os.O_RDWR | (os.O_CREAT | os.O_TRUNC if create else 0)
    fd = os.open(path, flags, 0o600)
    try:
        if create:
            os.ftruncate(fd, size)
            # Fault every page in now, while the ring is made: touched for the first time
            # by a version's copy, 8 MiB of 4 KiB pages cost 5-6 ms of that version's way.
            populate = getattr(mmap, "MAP_POPULATE", 0)
            return mmap.mmap(fd, 0, flags=mmap.MAP_SHARED | populate)
        return mmap.mmap(fd, 0)
    finally:
        os.close(fd)
