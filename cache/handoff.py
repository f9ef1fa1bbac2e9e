"""How a cache node's two threads hand work to each other; besides this they share only
the versions (cache/store.py) and the counters.

serve -> upstream: `want` a version a child asked for (queued; the upstream thread takes
them in batches), and `set_waited`, the versions children are parked on (the upstream
thread never skips one of those as superseded).
upstream -> serve: `tell` one `Note` per event of a version's way in. Each note is queued
and rings a zero-length message on an inproc PAIR, so the serve thread's poller wakes at
once (cut-through) and a slow serve thread holds the upstream one back at the PAIR's
high-water mark.
"""

from __future__ import annotations

import enum
import itertools
import queue
from collections.abc import Iterable, Iterator

import zmq

from canopy.version import Version

_ids = itertools.count()  # not id(): a dropped node's id may come back while its endpoint is bound


class Note(enum.Enum):
    """What the upstream thread tells the serve thread about a version."""

    CHUNK = "chunk"  # one more checked chunk is in: stream it on
    LANDED = "landed"  # held now (or held already)
    FAILED = "failed"  # not fetched (or superseded before it was): parked children get an error
    LOST = "lost"  # the parent went away mid-transfer: parked children wait for the next one


class Handoff:
    """The queues and the inproc bell between a node's serve and upstream threads."""

    def __init__(self, ctx: zmq.Context) -> None:
        addr = f"inproc://cache-handoff-{next(_ids)}"
        self.wake = ctx.socket(zmq.PAIR)  # the serve thread's end: polled with the ROUTER
        self.wake.bind(addr)
        self._bell = ctx.socket(zmq.PAIR)  # the upstream thread's end
        self._bell.connect(addr)
        self._notes: queue.SimpleQueue[tuple[Note, Version]] = queue.SimpleQueue()
        self._wanted: queue.Queue[Version] = queue.Queue()
        # Replaced whole, never changed in place: the upstream thread reads it without a lock.
        self._waited: frozenset[Version] = frozenset()

    # ---- serve thread -------------------------------------------------------------------
    def want(self, version: Version) -> None:
        """Queue a version a child asked for, for the upstream thread to fetch."""
        self._wanted.put(version)

    def set_waited(self, versions: Iterable[Version]) -> None:
        """The versions children are parked on now (replaces the previous set)."""
        self._waited = frozenset(versions)

    def notes(self) -> Iterator[tuple[Note, Version]]:
        """The notes rung so far, one per message on the PAIR, oldest first."""
        while self.wake.poll(0):
            self.wake.recv()
            yield self._notes.get_nowait()

    def close_serve_end(self) -> None:
        """Close the serve thread's end of the bell."""
        self.wake.close(0)

    # ---- upstream thread ----------------------------------------------------------------
    def tell(self, note: Note, version: Version) -> None:
        """Queue a note and ring the serve thread (blocks at the PAIR's high-water mark)."""
        self._notes.put((note, version))  # before the ring: a woken serve thread finds it
        self._bell.send(b"")

    def take_wanted(self) -> set[Version]:
        """Every version asked for since the last call, without waiting."""
        wanted = set()
        while True:
            try:
                wanted.add(self._wanted.get_nowait())
            except queue.Empty:
                return wanted

    def want_again(self, versions: Iterable[Version]) -> None:
        """Queue versions again (a fetch lost with its parent goes to the next one)."""
        for version in versions:
            self._wanted.put(version)

    def has_wanted(self) -> bool:
        """Whether a version was asked for that is not taken yet."""
        return not self._wanted.empty()

    def waited(self, version: Version) -> bool:
        """Whether a child is parked on `version` (then it is fetched even when superseded)."""
        return version in self._waited

    def close_upstream_end(self) -> None:
        """Close the upstream thread's end of the bell."""
        self._bell.close(0)
