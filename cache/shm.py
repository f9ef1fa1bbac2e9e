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
readers fetch it over the socket instead.
"""

from __future__ import annotations

import functools
import json
import mmap
import os
import time
from pathlib import Path

import numpy as np

from cache import blob
from cluster.errors import ProtocolError
from cluster.version import Version

SHM_DIR = Path("/dev/shm")
MAGIC = 0x43414E4F50590001
HEADER = 4096  # magic, slots, capacity, current slot; then per slot: version, size, meta length
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
        self.head[1:4] = (slots, self.capacity, -1)
        self.head[0] = MAGIC
        self.next_reader = 0
        self.skipped_total = 0

    def slot_version(self, i: int) -> int:
        return int(self.head[4 + 3 * i])

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
        current = int(self.head[3])
        order = sorted((i for i in range(self.slots) if i != current), key=self.slot_version)
        for i in order:
            old = self.slot_version(i)
            if old and (self.pins == old).any():
                continue
            self.head[4 + 3 * i] = 0  # invalid: readers arriving from now on see no version here
            time.sleep(PIN_GRACE_S)
            if old and (self.pins == old).any():
                self.head[4 + 3 * i] = old  # a reader pinned it meanwhile: leave that slot alone
                continue
            meta = json.dumps(manifest.to_fields()).encode()
            start = self.data0 + i * self.capacity
            for p in parts:
                self._data_map[start : start + len(p)] = p
                start += len(p)
            m0 = self.meta0 + i * META_BYTES
            self._data_map[m0 : m0 + len(meta)] = meta
            self.head[5 + 3 * i] = size
            self.head[6 + 3 * i] = len(meta)
            self.head[4 + 3 * i] = manifest.version.packed()
            self.head[3] = i
            return True
        self.skipped_total += 1
        return False

    def close(self) -> None:
        del self.head, self.pins
        self._data_map.close()
        self._pins_map.close()
        for p in (self.data_path, self.pins_path):
            p.unlink(missing_ok=True)


class ShmReader:
    """An actor's side. Example:
    r = ShmReader("run-node3", reader=17)
    got = r.take(version)      # (Manifest, {name: read-only view}) or None
    r.acting(version)          # the caller now acts with it: keep it from being overwritten
    """

    def __init__(self, tag: str, reader: int):
        self.tag, self.reader = tag, reader
        fd = os.open(SHM_DIR / f"canopy-{tag}.data", os.O_RDONLY)
        try:
            self._data_map = mmap.mmap(fd, 0, prot=mmap.PROT_READ)  # read-only: actors cannot corrupt it
        finally:
            os.close(fd)
        self._pins_map = _map(SHM_DIR / f"canopy-{tag}.pins", 0, create=False)
        self.head = np.frombuffer(self._data_map, dtype=np.int64, count=HEADER // 8)
        if int(self.head[0]) != MAGIC:
            raise ProtocolError(f"shared memory {tag} is not a canopy version ring")
        self.slots, self.capacity = int(self.head[1]), int(self.head[2])
        self.pins = np.frombuffer(self._pins_map, dtype=np.int64).reshape(-1, 2)
        if not 0 <= reader < len(self.pins):
            raise ProtocolError(f"reader index {reader} out of range")
        self.data0 = HEADER + self.slots * META_BYTES

    def take(self, version: Version) -> tuple[blob.Manifest, dict[str, np.ndarray]] | None:
        packed = version.packed()
        for i in range(self.slots):
            if int(self.head[4 + 3 * i]) != packed:
                continue
            self.pins[self.reader, 1] = packed
            if int(self.head[4 + 3 * i]) != packed:  # the writer got there first
                break
            m0 = HEADER + i * META_BYTES
            manifest = _manifest(bytes(self._data_map[m0 : m0 + int(self.head[6 + 3 * i])]))
            start = self.data0 + i * self.capacity
            view = memoryview(self._data_map)[start : start + int(self.head[5 + 3 * i])]
            return manifest, blob.arrays_of(manifest, view)
        self.pins[self.reader, 1] = 0
        return None

    def acting(self, version: Version) -> None:
        self.pins[self.reader, 0] = version.packed()

    def close(self) -> None:
        self.pins[self.reader] = 0
        del self.head, self.pins
        self._pins_map.close()
        # The data map may still back views a policy holds; it is released with them.


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
        return mmap.mmap(fd, 0)
    finally:
        os.close(fd)
