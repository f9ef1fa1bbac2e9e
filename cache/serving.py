"""A cache node's serve thread: answers children on the ROUTER and announces on the PUB.

The bottom of a node (cache/node.py): children (nodes or actors, all speaking
cache/protocol.py) get held versions from cache/store.py at once; a version still arriving
is streamed to every child that asked for it, chunk by chunk as the upstream thread's notes
come in (cache/handoff.py; children asking mid-flight get the chunks so far, then the
rest); any other version parks the child until one upstream fetch answers every parked
child (single flight). The PUB carries a new seq per landed version, and the same seq
again every `heartbeat_s` (clone pattern: a late or restarted child needs no resend to
everyone, the next beat names the newest version).

Notifications carry a topic frame (cache/protocol.py): `a` for arriving versions (child
nodes only), `v` when a version lands, `b` for heartbeats. Actors leave `a` out, so a
version on its way costs them nothing; a landed notification stands in for the next beat.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import zmq

from canopy import curve
from canopy.cache import protocol
from canopy.cache.handoff import Handoff, Note
from canopy.cache.shm import MAX_READERS
from canopy.cache.store import Entry, VersionStore
from canopy.config import CacheConfig
from canopy.errors import ProtocolError
from canopy.version import Version

MAX_PARKED = 100_000
MAX_BATCH = 1024  # requests taken per wake-up: notes from upstream are not kept waiting long


@dataclass
class Parked:
    """A child waiting for a version that upstream has not delivered yet; refused at `deadline`."""

    ident: bytes
    deadline: float


class Server:
    """A node's serve thread: the ROUTER to children, the PUB, and the children parked or streaming."""

    def __init__(
        self,
        cfg: CacheConfig,
        ctx: zmq.Context,
        name: str,
        shm_tag: str,
        store: VersionStore,
        handoff: Handoff,
        counters: dict,
    ) -> None:
        self.cfg, self.name, self.shm_tag = cfg, name, shm_tag
        self.store, self.handoff, self.counters = store, handoff, counters
        self.fetch_sock = ctx.socket(zmq.ROUTER)
        self.notify_sock = ctx.socket(zmq.PUB)
        for s in (self.fetch_sock, self.notify_sock):
            s.setsockopt(zmq.LINGER, 0)
        self.fetch_sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_REQUEST_BYTES)
        self.notify_sock.setsockopt(zmq.SNDHWM, 100_000)
        self.fetch_sock.setsockopt(zmq.SNDHWM, 100_000)
        self.parked: dict[Version, list[Parked]] = {}
        self.streams: dict[Version, dict[bytes, int]] = {}  # child -> chunks sent so far
        self.announced: set[Version] = set()  # arriving versions already announced
        self.children: dict[bytes, float] = {}
        self.seq = 0
        self.next_reader = 0
        self._next_beat = 0.0
        self.gate: curve.Gate | None = None  # names each request's role when CURVE is on

    def bind(self, fetch: str, notify: str) -> tuple[str, str]:
        """Bind the ROUTER and the PUB; returns the endpoints bound (port 0 resolved)."""
        self.gate = curve.bind(self.fetch_sock, fetch, protocol.FETCH_DOMAIN, protocol.FETCH_ROLES)
        curve.bind(self.notify_sock, notify, protocol.NOTIFY_DOMAIN, protocol.NOTIFY_ROLES)
        return (
            self.fetch_sock.getsockopt_string(zmq.LAST_ENDPOINT),
            self.notify_sock.getsockopt_string(zmq.LAST_ENDPOINT),
        )

    def close(self) -> None:
        """Close the ROUTER and the PUB."""
        self.fetch_sock.close(0)
        self.notify_sock.close(0)

    def take_requests(self) -> None:
        """Handle up to MAX_BATCH queued requests without blocking."""
        for _ in range(MAX_BATCH):
            try:
                frames = self.fetch_sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._handle(frames)

    def beat(self, now: float) -> None:
        """Announce the newest version and expire parked children, once per `heartbeat_s`."""
        if now >= self._next_beat:
            self._announce()
            self._expire_parked(now)
            self._next_beat = now + self.cfg.heartbeat_s

    def _announce(self) -> None:
        newest = self.store.newest()
        dead = [
            c for c, seen in self.children.items() if time.monotonic() - seen > 3 * self.cfg.parent_timeout_s
        ]
        for c in dead:
            del self.children[c]
        self.counters["children"] = len(self.children)
        if newest is not None:
            self.notify_sock.send_multipart(
                protocol.notify(newest, self.seq, self.name, self.store.shm_name(), topic=protocol.TOPIC_BEAT)
            )
        else:  # a heartbeat still: children must know their parent lives before any version
            beat = protocol.notify(None, self.seq, self.name, "", topic=protocol.TOPIC_BEAT)
            self.notify_sock.send_multipart(beat)

    # ---- notes from the upstream thread -------------------------------------------------
    def on_upstream(self, note: Note, version: Version) -> None:
        """A note from the upstream thread. The parked children of a LOST version keep
        waiting for the next parent; streaming ones are told to ask again."""
        if note is Note.CHUNK:
            self._on_chunk(version)
            return
        self.announced.discard(version)
        waiting = [p.ident for p in self._unpark(version)] if note is not Note.LOST else []
        streaming = self.streams.pop(version, {})
        if note is Note.LANDED:
            self.seq += 1
            if version == self.store.newest():
                self._announce_landed(version)
            entry = self.store.entry(version)
            for ident, sent in streaming.items():
                self._send_version(ident, entry, sent)
            for ident in waiting:
                self._send_version(ident, entry)
        else:
            for ident in [*streaming, *waiting]:
                self._refuse(ident, protocol.UNKNOWN_VERSION, f"upstream does not hold {version}")

    def _on_chunk(self, version: Version) -> None:
        if version not in self.announced:  # child nodes may start streaming it now
            self.announced.add(version)
            newest = self.store.newest()
            self.notify_sock.send_multipart(
                protocol.notify(newest, self.seq, self.name, self.store.shm_name(), version)
            )
        parked = self.parked.get(version, [])
        if all(self._start_stream(p.ident, version) for p in parked):
            self._unpark(version)
            self._stream(version)
        # else landed meanwhile: the LANDED note that follows answers them

    def _announce_landed(self, version: Version) -> None:
        self.notify_sock.send_multipart(
            protocol.notify(version, self.seq, self.name, self.store.shm_name(), topic=protocol.TOPIC_LANDED)
        )
        # It told every child what the next beat would: skip that one (a beat wakes
        # every actor of the host).
        self._next_beat = time.monotonic() + self.cfg.heartbeat_s
        stages = self.counters.get("stages")
        if stages and stages.get("version") == str(version):
            self.counters["stages"] = {**stages, "announced": time.time()}

    # ---- sending ------------------------------------------------------------------------
    def _start_stream(self, ident: bytes, version: Version) -> bool:
        """Send the version header to a child; False when the version is no longer arriving."""
        partial = self.store.arriving(version)
        if partial is None:
            return False
        self.fetch_sock.send_multipart([ident, *protocol.version_header(partial.manifest)])
        self.streams.setdefault(version, {})[ident] = 0
        return True

    def _stream(self, version: Version) -> None:
        """Send every streaming child of `version` the chunks it lacks of those in so far."""
        chunks = self.store.chunks_so_far(version)
        for ident, sent in self.streams.get(version, {}).items():
            for i in range(sent, len(chunks)):
                self._send(ident, protocol.chunk_message(version, i, chunks[i]), len(chunks[i]))
            self.streams[version][ident] = max(sent, len(chunks))

    def _send(self, ident: bytes, msg: list, nbytes: int = 0) -> None:
        self.fetch_sock.send_multipart([ident, *msg], copy=False)
        self.counters["served_bytes_total"] += nbytes

    def _send_version(self, ident: bytes, entry: Entry | None, sent: int = -1) -> None:
        """The whole reply, or (sent >= 0) the chunks after the `sent` a stream already had."""
        if entry is None:
            self._refuse(ident, protocol.UNKNOWN_VERSION, "evicted")
            return
        sizes = [0, *(len(c[-1]) for c in entry.messages[1:])]
        for i in range(sent + 1, len(entry.messages)):
            self._send(ident, entry.messages[i], sizes[i])

    # ---- parked children ----------------------------------------------------------------
    def _park(self, version: Version, ident: bytes) -> None:
        self.parked.setdefault(version, []).append(
            Parked(ident, time.monotonic() + self.cfg.request_timeout_s)
        )
        self.handoff.set_waited(self.parked)

    def _unpark(self, version: Version) -> list[Parked]:
        parked = self.parked.pop(version, [])
        self.handoff.set_waited(self.parked)
        return parked

    def _expire_parked(self, now: float) -> None:
        for version in list(self.parked):
            keep = [p for p in self.parked[version] if p.deadline > now]
            for p in self.parked[version]:
                if p.deadline <= now:
                    self._refuse(p.ident, protocol.UNKNOWN_VERSION, f"{version} did not arrive in time")
            if keep:
                self.parked[version] = keep
            else:
                del self.parked[version]
        self.handoff.set_waited(self.parked)

    # ---- requests -----------------------------------------------------------------------
    def _handle(self, frames: list[zmq.Frame]) -> None:
        ident = frames[0].bytes
        try:
            role = self.gate.role_of(frames[1]) if self.gate is not None and len(frames) > 1 else None
            if self.gate is not None and role is None:
                self._forbid(ident, "your key is no longer authorized")
                return
            msg = protocol.read_request(frames[1:])
            if self.gate is not None and msg.op in protocol.ROLES and role not in protocol.ROLES[msg.op]:
                self._forbid(ident, f"{msg.op} is not for the {role} role")
                return
            self.children[ident] = time.monotonic()
            if msg.op == protocol.HB:
                return
            self.counters["fetch_requests_total"] += 1
            if msg.op == protocol.HELLO:
                self._hello(ident)
                return
            # `requested_version` refuses every op but GET (HB and HELLO were answered above).
            version = self.store.newest() if msg.op == protocol.LATEST else protocol.requested_version(msg)
            entry, arriving = self.store.lookup(version)
            if entry is not None:
                self._send_version(ident, entry)
            elif arriving and self._start_stream(ident, version):
                self._stream(version)  # cut-through: the chunks so far now, the rest as they come
            elif msg.op == protocol.GET and sum(map(len, self.parked.values())) < MAX_PARKED:
                # Single flight: park the child; one upstream fetch serves every parked child.
                self._park(version, ident)
                if self.store.claim(version):
                    self.handoff.want(version)
            else:
                self._refuse(ident, protocol.UNKNOWN_VERSION, f"this node does not hold {version}")
        except (ProtocolError, ValueError, TypeError, KeyError) as exc:
            # Input that slipped past the schema checks must not take the node down either.
            self.counters["rejected_total"] += 1
            self._refuse(ident, protocol.BAD_REQUEST, str(exc))

    def _hello(self, ident: bytes) -> None:
        # Pin cells are handed out by the node, not the ring: they stay valid when a larger
        # version makes the node open a new ring under a new tag.
        reader = self.next_reader if self.shm_tag and self.next_reader < MAX_READERS else -1
        self.next_reader += reader >= 0
        reply = protocol.hello_reply(self.store.newest(), self.seq, self.name, self.store.shm_name(), reader)
        self.fetch_sock.send_multipart([ident, *reply])

    def _forbid(self, ident: bytes, message: str) -> None:
        self.counters["forbidden_total"] += 1
        self._refuse(ident, protocol.FORBIDDEN, message)

    def _refuse(self, ident: bytes, code: str, message: str) -> None:
        self.fetch_sock.send_multipart([ident, *protocol.error_reply(code, message)])
