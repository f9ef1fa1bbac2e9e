"""Cache node: fetches each policy version from its parent once and serves it to children.

Middle of the model data flow: learner -> Redis root -> node -> ... -> node -> actors.
The parent is the Redis root or another node (the first reachable entry of `parents`);
children are nodes or actors, all speaking cache/protocol.py. Two threads:

- upstream: follows the parent (Redis: `model:notify` plus a re-read of `model:latest`
  every `poll_s`; node: its notify socket) and fetches each version the tree wants
  exactly once (single flight: one fetcher, and a version in flight or held is never
  fetched again, however many children ask). Chunks arrive in order (from Redis: asked for
  two ahead and read straight into one buffer per version, cache/rawget.py) and each is
  checked against its digest in the manifest, then handed to the serve thread at once
  (cut-through); the whole payload digest is checked before the version counts as held.
  It sends its own heartbeats to a node parent. A parent silent
  for `parent_timeout_s` is replaced by the next entry of `parents` (grandparent,
  sibling, Redis), and the node catches up from the new parent's notify/hello.
- serve: answers children on the ROUTER, streams each chunk of a version in flight to
  every child that asked for it as soon as the chunk is in (children asking mid-flight get
  the chunks so far, then the rest), and announces on the PUB: a new seq per landed version,
  the same seq again every `heartbeat_s` (clone pattern: a late or restarted child needs
  no resend to everyone, the next beat names the newest version).

A leaf node with `shm_tag` also writes each version once to the host's shared-memory ring
(cache/shm.py) for actors on its host: a raw version chunk by chunk as the checked chunks
arrive (cut-through into the ring; the slot becomes visible only once the whole payload
digest is checked), a lossy one decoded once it is whole.

Notifications carry a topic frame (cache/protocol.py): `a` for arriving versions (child
nodes only), `v` when a version lands, `b` for heartbeats. Actors leave `a` out, so a
version on its way costs them nothing; a landed notification stands in for the next beat.

`counters["stages"]` holds unix times of the newest landed version's way through the
node (heard of it, manifest in, last chunk in, stored and in shared memory, announced):
the broadcast bench's per-stage breakdown.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import redis
import xxhash
import zmq

from cache import blob, protocol
from cache.rawget import ChunkReader
from cache.shm import MAX_READERS, ShmWriter
from cluster import curve, wire
from cluster.config import CacheConfig
from cluster.errors import ProtocolError
from cluster.keys import Keys
from cluster.version import Version

MAX_REQUEST_BYTES = protocol.MAX_REQUEST_BYTES
MAX_PARKED = 100_000
STARTUP_GRACE_S = 10.0  # how long a node waits for the first word of its first node parent


@dataclass(frozen=True)
class Parent:
    """One upstream candidate: a node's endpoints, or the Redis root when both are empty."""

    fetch: str = ""
    notify: str = ""

    @property
    def is_redis(self) -> bool:
        return not self.fetch


@dataclass
class Entry:
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


@dataclass
class Parked:
    ident: bytes
    deadline: float


class CacheNode:
    def __init__(
        self,
        cfg: CacheConfig,
        r: redis.Redis | None,
        keys: Keys,
        ctx: zmq.Context | None = None,
        parents: list[Parent] | None = None,
        name: str = "cache-0",
        shm_tag: str = "",
    ):
        self.cfg, self.r, self.keys, self.name = cfg, r, keys, name
        self.parents = parents or [Parent()]
        if any(p.is_redis for p in self.parents) and r is None:
            raise ValueError("a node with the Redis root among its parents needs a Redis client")
        self.ctx = ctx or zmq.Context.instance()
        self.fetch_sock = self.ctx.socket(zmq.ROUTER)
        self.notify_sock = self.ctx.socket(zmq.PUB)
        for s in (self.fetch_sock, self.notify_sock):
            s.setsockopt(zmq.LINGER, 0)
        self.fetch_sock.setsockopt(zmq.MAXMSGSIZE, MAX_REQUEST_BYTES)
        self.notify_sock.setsockopt(zmq.SNDHWM, 100_000)
        self.fetch_sock.setsockopt(zmq.SNDHWM, 100_000)
        self.versions: OrderedDict[Version, Entry] = OrderedDict()  # newest last
        self.lock = threading.Lock()
        self.wanted: queue.Queue[Version] = queue.Queue()
        self.in_flight: set[Version] = set()  # asked of upstream, not landed or failed yet
        self.parked: dict[Version, list[Parked]] = {}
        self.partial: dict[Version, Partial] = {}  # shared with upstream, under `lock`
        self.streams: dict[Version, dict[bytes, int]] = {}  # child -> chunks sent so far
        self.announced: set[Version] = set()  # arriving versions already announced
        self.children: dict[bytes, float] = {}
        self.seq = 0
        self.shm_tag = shm_tag
        self.shm: ShmWriter | None = None
        self.next_reader = 0
        self.parent_index = 0
        self._heard_a_parent = False
        self._next_beat = 0.0
        # Chunks from Redis skip redis-py (cache/rawget.py); only the upstream thread uses it.
        self._chunk_reader = ChunkReader.for_client(r) if r is not None else None
        self._stages: dict[Version, dict[str, float]] = {}  # unix times per arriving version
        self.counters: dict = {
            "versions_fetched_total": 0,
            "upstream_fetches_total": 0,
            "upstream_bytes_total": 0,
            "served_bytes_total": 0,
            "fetch_requests_total": 0,
            "rejected_total": 0,
            "upstream_errors_total": 0,
            "missed_notifications_total": 0,
            "failovers_total": 0,
            "shm_skipped_total": 0,
            "children": 0,
            "parent": self._parent_name(),
            "policy_version": "0.0",
            "stages": {},
        }

    # ---- setup ----------------------------------------------------------------------
    def bind(self, fetch: str, notify: str) -> tuple[str, str]:
        curve.bind(self.fetch_sock, fetch)
        curve.bind(self.notify_sock, notify)
        return (
            self.fetch_sock.getsockopt_string(zmq.LAST_ENDPOINT),
            self.notify_sock.getsockopt_string(zmq.LAST_ENDPOINT),
        )

    def newest(self) -> Version | None:
        with self.lock:
            return next(reversed(self.versions), None)

    # ---- serve thread -----------------------------------------------------------------
    def serve(self, stop: threading.Event) -> None:
        wake = self.ctx.socket(zmq.PAIR)
        wake_addr = f"inproc://cache-wake-{id(self)}"
        wake.bind(wake_addr)
        upstream = threading.Thread(target=self._upstream, args=(stop, wake_addr), daemon=True)
        upstream.start()
        poller = zmq.Poller()
        poller.register(self.fetch_sock, zmq.POLLIN)
        poller.register(wake, zmq.POLLIN)
        try:
            while not stop.is_set():
                events = dict(poller.poll(50))
                if wake in events:
                    while wake.poll(0):
                        self._on_upstream(wake.recv_string())
                if self.fetch_sock in events:
                    for _ in range(1024):
                        try:
                            frames = self.fetch_sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._handle(frames)
                now = time.monotonic()
                if now >= self._next_beat:
                    self._announce()
                    self._expire_parked(now)
                    self._next_beat = now + self.cfg.heartbeat_s
        finally:
            upstream.join(timeout=5)
            if self._chunk_reader is not None:
                self._chunk_reader.close()
            wake.close(0)
            self.fetch_sock.close(0)
            self.notify_sock.close(0)
            if self.shm is not None:
                self.shm.close()

    def _announce(self) -> None:
        newest = self.newest()
        dead = [
            c for c, seen in self.children.items() if time.monotonic() - seen > 3 * self.cfg.parent_timeout_s
        ]
        for c in dead:
            del self.children[c]
        self.counters["children"] = len(self.children)
        if newest is not None:
            self.notify_sock.send_multipart(
                protocol.notify(str(newest), self.seq, self.name, self._shm_name(), topic=protocol.TOPIC_BEAT)
            )
        else:  # a heartbeat still: children must know their parent lives before any version
            beat = protocol.notify("", self.seq, self.name, "", topic=protocol.TOPIC_BEAT)
            self.notify_sock.send_multipart(beat)

    def _shm_name(self) -> str:
        return self.shm.tag if self.shm is not None else ""

    def _on_upstream(self, note: str) -> None:
        """A note from the upstream thread: `chunk V` (one more chunk in), `landed V`,
        `failed V`, or `lost V` (the parent went away mid-transfer: parked children keep
        waiting for the next parent, streaming ones are told to ask again)."""
        kind, _, text = note.partition(" ")
        version = Version.parse(text)
        if kind == "chunk":
            if version not in self.announced:  # child nodes may start streaming it now
                self.announced.add(version)
                newest = self.newest()
                self.notify_sock.send_multipart(
                    protocol.notify(
                        str(newest) if newest else "", self.seq, self.name, self._shm_name(), str(version)
                    )
                )
            parked = self.parked.pop(version, [])
            if all(self._start_stream(p.ident, version) for p in parked):
                self._stream(version)
            else:  # landed meanwhile: the `landed` note that follows answers them
                self.parked[version] = parked
            return
        self.announced.discard(version)
        waiting = [p.ident for p in self.parked.pop(version, [])] if kind != "lost" else []
        streaming = self.streams.pop(version, {})
        if kind == "landed":
            self.seq += 1
            if version == self.newest():
                self.notify_sock.send_multipart(
                    protocol.notify(
                        str(version), self.seq, self.name, self._shm_name(), topic=protocol.TOPIC_LANDED
                    )
                )
                # It told every child what the next beat would: skip that one (a beat wakes
                # every actor of the host).
                self._next_beat = time.monotonic() + self.cfg.heartbeat_s
                stages = self.counters.get("stages")
                if stages and stages.get("version") == str(version):
                    self.counters["stages"] = {**stages, "announced": time.time()}
            with self.lock:
                entry = self.versions.get(version)
            for ident, sent in streaming.items():
                self._send_version(ident, entry, sent)
            for ident in waiting:
                self._send_version(ident, entry)
        else:
            for ident in [*streaming, *waiting]:
                self.fetch_sock.send_multipart(
                    [ident, *wire.error_reply("unknown_version", f"upstream does not hold {version}")]
                )

    def _start_stream(self, ident: bytes, version: Version) -> bool:
        """Send the version header to a child; False when the version is no longer arriving."""
        with self.lock:
            partial = self.partial.get(version)
        if partial is None:
            return False
        self.fetch_sock.send_multipart([ident, *protocol.version_header(partial.manifest)])
        self.streams.setdefault(version, {})[ident] = 0
        return True

    def _stream(self, version: Version) -> None:
        """Send every streaming child of `version` the chunks it lacks of those in so far."""
        with self.lock:
            partial = self.partial.get(version)
            chunks = list(partial.chunks) if partial is not None else []
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
            self.fetch_sock.send_multipart([ident, *wire.error_reply("unknown_version", "evicted")])
            return
        sizes = [0, *(len(c[-1]) for c in entry.messages[1:])]
        for i in range(sent + 1, len(entry.messages)):
            self._send(ident, entry.messages[i], sizes[i])

    def _expire_parked(self, now: float) -> None:
        for version in list(self.parked):
            keep = [p for p in self.parked[version] if p.deadline > now]
            for p in self.parked[version]:
                if p.deadline <= now:
                    self.fetch_sock.send_multipart(
                        [p.ident, *wire.error_reply("unknown_version", f"{version} did not arrive in time")]
                    )
            if keep:
                self.parked[version] = keep
            else:
                del self.parked[version]

    def _handle(self, frames: list[bytes]) -> None:
        ident = frames[0]
        try:
            msg = wire.decode(frames[1:], MAX_REQUEST_BYTES)
            self.children[ident] = time.monotonic()
            if msg.op == "hb":
                return
            self.counters["fetch_requests_total"] += 1
            if msg.op == "hello":
                # Pin cells are handed out by the node, not the ring: they stay valid when a
                # larger version makes the node open a new ring under a new tag.
                reader = self.next_reader if self.shm_tag and self.next_reader < MAX_READERS else None
                self.next_reader += reader is not None
                newest = self.newest()
                self.fetch_sock.send_multipart(
                    [
                        ident,
                        *wire.encode(
                            {
                                "op": "hello",
                                "version": str(newest) if newest else "",
                                "seq": self.seq,
                                "node": self.name,
                                "host": protocol.HOST,
                                "shm": self._shm_name(),
                                "reader": -1 if reader is None else reader,
                            }
                        ),
                    ]
                )
                return
            if msg.op == "latest":
                version = self.newest()
            elif msg.op == "get":
                version = Version.parse(protocol.header_str(msg.header, "version"))
            else:
                raise ProtocolError(f"unknown op {msg.op!r}")
            with self.lock:
                entry = self.versions.get(version) if version else None
                arriving = version in self.partial
            if entry is not None:
                self._send_version(ident, entry)
            elif arriving and self._start_stream(ident, version):
                self._stream(version)  # cut-through: the chunks so far now, the rest as they come
            elif msg.op == "get" and sum(map(len, self.parked.values())) < MAX_PARKED:
                # Single flight: park the child; one upstream fetch serves every parked child.
                self.parked.setdefault(version, []).append(
                    Parked(ident, time.monotonic() + self.cfg.request_timeout_s)
                )
                with self.lock:
                    ask = version not in self.in_flight
                    self.in_flight.add(version)
                if ask:
                    self.wanted.put(version)
            else:
                self.fetch_sock.send_multipart(
                    [ident, *wire.error_reply("unknown_version", f"this node does not hold {version}")]
                )
        except (ProtocolError, ValueError, TypeError, KeyError) as exc:
            # Input that slipped past the schema checks must not take the node down either.
            self.counters["rejected_total"] += 1
            self.fetch_sock.send_multipart([ident, *wire.error_reply("bad_request", str(exc))])

    # ---- upstream thread --------------------------------------------------------------
    def _parent_name(self) -> str:
        p = self.parents[self.parent_index]
        return "redis" if p.is_redis else p.fetch

    def _upstream(self, stop: threading.Event, wake_addr: str) -> None:
        wake = self.ctx.socket(zmq.PAIR)
        wake.connect(wake_addr)
        try:
            while not stop.is_set():
                parent = self.parents[self.parent_index]
                follow = self._follow_redis if parent.is_redis else self._follow_node
                follow(parent, stop, wake)  # returns when the parent is lost or on stop
                if stop.is_set():
                    break
                self.parent_index = (self.parent_index + 1) % len(self.parents)
                self.counters["failovers_total"] += 1
                self.counters["parent"] = self._parent_name()
        finally:
            wake.close(0)

    def _want_newer(self, version: Version) -> None:
        newest = self.newest()
        with self.lock:
            if (newest is None or version > newest) and version not in self.in_flight:
                self.in_flight.add(version)
                self.wanted.put(version)

    def _drain_wanted(self, fetch, wake: zmq.Socket) -> None:
        """Fetch every wanted version, newest-first (stale intermediate ones are skipped)."""
        wanted = set()
        while True:
            try:
                wanted.add(self.wanted.get_nowait())
            except queue.Empty:
                break
        for version in sorted(wanted, reverse=True):
            if version not in wanted:
                continue
            ok = False
            try:
                newest = self.newest()
                with self.lock:
                    held = version in self.versions
                parked = version in self.parked
                if held:
                    ok = True
                elif newest is not None and version < newest and not parked:
                    ok = False  # superseded before we got to it, and no child is waiting
                else:
                    manifest, chunks = fetch(version, wake)
                    self._store(manifest, chunks)
                    ok = True
            except (redis.RedisError, ProtocolError, zmq.ZMQError) as exc:
                self.counters["upstream_errors_total"] += 1
                self.counters["last_upstream_error"] = str(exc)[:200]
                self._shm_abort(version)
            except ParentLost:
                # Ask again of the next parent; parked children keep waiting meanwhile (those
                # already streaming get an error and ask again).
                self._shm_abort(version)
                with self.lock:
                    self.partial.pop(version, None)
                wake.send_string(f"lost {version}")
                for v in wanted:
                    self.wanted.put(v)
                raise
            with self.lock:
                self.in_flight.discard(version)
                self.partial.pop(version, None)
            wake.send_string(f"{'landed' if ok else 'failed'} {version}")
            wanted.discard(version)

    def _stage(self, version: Version, name: str) -> None:
        stages = self._stages.setdefault(version, {})
        stages.setdefault(name, time.time())
        while len(self._stages) > 16:
            del self._stages[next(iter(self._stages))]

    def _begin(self, manifest: blob.Manifest) -> None:
        self._stage(manifest.version, "begun")
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

    def _add_chunk(self, manifest: blob.Manifest, chunk: bytes | memoryview, wake: zmq.Socket) -> None:
        """One more checked chunk: the serve thread passes it on right away (cut-through),
        and a leaf copies it into its reserved ring slot while the next one arrives."""
        with self.lock:
            partial = self.partial[manifest.version]
            partial.chunks.append(chunk)
        wake.send_string(f"chunk {manifest.version}")
        partial.hasher.update(chunk)  # while the next chunk arrives: the whole digest is ready at the end
        if partial.shm_slot >= 0 and self.shm is not None:
            if partial.shm_offset + len(chunk) > manifest.decoded_size:
                self._shm_abort(manifest.version)  # more bytes than the manifest says: refused at the end
            elif self.shm.write(partial.shm_slot, partial.shm_offset, chunk):
                partial.shm_offset += len(chunk)
            else:  # a reader pinned the slot's old version meanwhile: skip the ring this time
                partial.shm_slot = -1
                self.counters["shm_skipped_total"] += 1

    def _shm_abort(self, version: Version) -> None:
        with self.lock:
            partial = self.partial.get(version)
        if partial is not None and partial.shm_slot >= 0 and self.shm is not None:
            self.shm.abort(partial.shm_slot)
            partial.shm_slot = -1

    def _store(self, manifest: blob.Manifest, chunks: list) -> None:
        self._stage(manifest.version, "fetched")
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
            self._shm_abort(manifest.version)
            raise
        self.counters["upstream_fetches_total"] += 1
        self.counters["upstream_bytes_total"] += manifest.size
        messages = protocol.version_messages(manifest, chunks)
        entry = Entry(manifest, messages, chunks if manifest.codec == "raw" else None)
        if partial is not None and partial.shm_slot >= 0 and self.shm is not None:
            # Written as it arrived; the payload digest (the decoded one, for raw) was just checked.
            if partial.shm_offset == manifest.decoded_size:
                self.shm.commit(partial.shm_slot, manifest)
            else:  # cannot happen for a checked version; never show a partial one
                self.shm.abort(partial.shm_slot)
                self.counters["shm_skipped_total"] += 1
            partial.shm_slot = -1
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
        self._stage(manifest.version, "stored")
        if newest == manifest.version:
            stages = self._stages.get(manifest.version, {})
            self.counters["stages"] = {"version": str(manifest.version), **stages}

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

    def _follow_redis(self, parent: Parent, stop: threading.Event, wake: zmq.Socket) -> None:
        assert self.r is not None
        pubsub = self.r.pubsub(ignore_subscribe_messages=True)
        failing_since: float | None = None
        next_poll = 0.0
        try:
            while not stop.is_set():
                try:
                    if pubsub.connection is None:
                        pubsub.subscribe(self.keys.model_notify)
                    note = pubsub.get_message(timeout=0.05)
                    if note is not None and note.get("type") == "message":
                        version = Version.parse(note["data"])
                        self._stage(version, "heard")
                        self._want_newer(version)
                        self._drain_wanted(self._fetch_redis, wake)  # first, then the pointer
                    if time.monotonic() >= next_poll or not self.wanted.empty():
                        # Whatever woke us, the latest pointer is the truth (clone pattern).
                        latest = self.r.get(self.keys.model_latest)
                        if latest is not None:
                            self._want_newer(Version.parse(latest))
                        next_poll = time.monotonic() + self.cfg.poll_s
                    self._drain_wanted(self._fetch_redis, wake)
                    failing_since = None
                except (redis.RedisError, ProtocolError) as exc:
                    self.counters["upstream_errors_total"] += 1
                    self.counters["last_upstream_error"] = str(exc)[:200]
                    failing_since = failing_since or time.monotonic()
                    if len(self.parents) > 1 and time.monotonic() - failing_since > self.cfg.parent_timeout_s:
                        return
                    stop.wait(0.1)
        finally:
            with contextlib.suppress(redis.RedisError):
                pubsub.close()

    def _fetch_redis(self, version: Version, wake: zmq.Socket) -> tuple[blob.Manifest, list]:
        """The manifest, then the chunks read into one buffer (cache/rawget.py); each is
        checked and passed on (and copied into the ring) while the next one arrives."""
        assert self.r is not None and self._chunk_reader is not None
        manifest = blob.read_manifest(self.r, self.keys, version)
        self._begin(manifest)
        keys = [self.keys.model_chunk(version, i) for i in range(manifest.chunks)]
        chunks: list = []
        with contextlib.closing(self._chunk_reader.read(keys, manifest.size, blob.CHUNK_BYTES)) as replies:
            for chunk in replies:
                blob.check_chunk(manifest, len(chunks), chunk)
                chunks.append(chunk)
                self._add_chunk(manifest, chunk, wake)
        return manifest, chunks

    def _follow_node(self, parent: Parent, stop: threading.Event, wake: zmq.Socket) -> None:
        self._sub = self.ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._sub.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_NOTIFY_BYTES)
        curve.connect(self._sub, parent.notify)
        self._req = self._dealer(parent)
        self._last_heard = time.monotonic()
        self._last_seq: int | None = None
        # A parent never heard from may still be starting (nodes of a tree start together).
        patience = self.cfg.parent_timeout_s if self._heard_a_parent else STARTUP_GRACE_S
        next_hb = 0.0
        try:
            while not stop.is_set():
                if self._sub.poll(50):
                    self._read_notifies()
                    if self._last_seq is not None:
                        self._heard_a_parent, patience = True, self.cfg.parent_timeout_s
                now = time.monotonic()
                if now - self._last_heard > patience:
                    return  # parent silent: fail over
                if now >= next_hb:
                    self._req.send_multipart(wire.encode({"op": "hb", "child": self.name}))
                    next_hb = now + self.cfg.heartbeat_s
                self._drain_wanted(self._fetch_node, wake)
        except ParentLost:
            return
        finally:
            self._sub.close(0)
            self._req.close(0)

    def _read_notifies(self) -> None:
        while True:
            try:
                msg, version, seq = protocol.recv_notify(self._sub)
                arriving = protocol.header_str(msg.header, "arriving")
                if arriving:  # the parent is receiving it: ask now and get it streamed
                    self._stage(Version.parse(arriving), "heard")
                    self._want_newer(Version.parse(arriving))
            except zmq.Again:
                return
            except ProtocolError:
                self.counters["rejected_total"] += 1
                continue
            self._last_heard = time.monotonic()
            if self._last_seq is not None and seq > self._last_seq + 1:
                self.counters["missed_notifications_total"] += seq - self._last_seq - 1
            self._last_seq = seq if self._last_seq is None else max(self._last_seq, seq)
            if version is not None:
                self._want_newer(version)

    def _dealer(self, parent: Parent) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_REPLY_BYTES)
        curve.connect(sock, parent.fetch)
        return sock

    def _fetch_node(self, version: Version, wake: zmq.Socket) -> tuple[blob.Manifest, list]:
        self._req.send_multipart(wire.encode({"op": "get", "version": str(version)}))
        assembly, passed = protocol.Assembly(), 0
        deadline = time.monotonic() + self.cfg.request_timeout_s
        while time.monotonic() < deadline:
            wait_ms = 50
            while self._req.poll(wait_ms):  # wait for one message, then take all that queued
                wait_ms = 0
                assembly.feed(self._req.recv_multipart(copy=False))
                m = assembly.manifest
                if m is None:
                    continue
                if m.version != version:
                    assembly.reset()  # a late reply to an earlier request
                    continue
                if not passed:
                    self._begin(m)
                for chunk in assembly.chunks[passed:]:  # pass on the very buffers received
                    self._add_chunk(m, chunk, wake)
                passed = len(assembly.chunks)
                deadline = time.monotonic() + self.cfg.request_timeout_s  # it is progressing
                if assembly.complete:
                    return m, assembly.chunks
            self._read_notifies()  # heartbeats keep arriving during a long transfer
            if time.monotonic() - self._last_heard > self.cfg.parent_timeout_s:
                raise ParentLost(f"parent went silent while sending {version}")
        # Lazy pirate: a fresh socket so a late reply is never taken for the next one.
        self._req.close(0)
        self._req = self._dealer(self.parents[self.parent_index])
        raise ProtocolError(f"parent did not send {version} within {self.cfg.request_timeout_s}s")


class ParentLost(Exception):
    """The node parent stopped beating: the upstream thread moves to the next candidate."""
