"""A cache node's upstream thread: follows the parent and fetches each version once.

The top of a node (cache/node.py): the parent is the Redis root (`model:notify` plus a
re-read of `model:latest` every `poll_s`) or a node parent (its notify socket; this thread
sends it heartbeats). Each version the tree wants is fetched exactly once (single flight,
cache/store.py): chunks arrive in order (from Redis: asked for two ahead and read straight
into one buffer per version, cache/rawget.py), each is checked against its digest in the
manifest and staged in the store, and the serve thread is told at once (cut-through,
cache/handoff.py); the whole payload digest is checked before the version counts as held.
A parent silent for `parent_timeout_s` is replaced by the next entry of `parents`
(grandparent, sibling, Redis), and the node catches up from the new parent's notify/hello.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis
import zmq

from canopy import curve
from canopy.cache import blob, protocol
from canopy.cache.handoff import Handoff, Note
from canopy.cache.rawget import ChunkReader
from canopy.cache.store import VersionStore
from canopy.config import CacheConfig
from canopy.errors import ProtocolError
from canopy.keys import Keys
from canopy.version import Version

STARTUP_GRACE_S = 10.0  # how long a node waits for the first word of its first node parent

Fetch = Callable[[Version], tuple[blob.Manifest, list]]


@dataclass(frozen=True)
class Parent:
    """One upstream candidate: a node's endpoints, or the Redis root when both are empty."""

    fetch: str = ""
    notify: str = ""

    @property
    def is_redis(self) -> bool:
        """True for the Redis root (no fetch endpoint)."""
        return not self.fetch

    @property
    def name(self) -> str:
        """How counters name it: "redis" or its fetch endpoint."""
        return "redis" if self.is_redis else self.fetch


class ParentLost(Exception):
    """The node parent stopped beating: the upstream thread moves to the next candidate."""


def _dealer(ctx: zmq.Context, parent: Parent) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_REPLY_BYTES)
    curve.connect(sock, parent.fetch, curve.CACHE_SERVER)
    return sock


class NodeLink:
    """The sockets to one node parent and what was last heard on them, for as long as the
    upstream thread follows that parent."""

    def __init__(self, ctx: zmq.Context, parent: Parent) -> None:
        self.ctx, self.parent = ctx, parent
        self.sub = ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_NOTIFY_BYTES)
        curve.connect(self.sub, parent.notify, curve.CACHE_SERVER)
        self.req = _dealer(ctx, parent)
        self.last_heard = time.monotonic()
        self.last_seq: int | None = None

    def redial(self) -> None:
        """Lazy pirate: a fresh socket so a late reply is never taken for the next one."""
        self.req.close(0)
        self.req = _dealer(self.ctx, self.parent)

    def close(self) -> None:
        """Close both sockets."""
        self.sub.close(0)
        self.req.close(0)


class Upstream:
    """A node's upstream thread: follows one parent at a time and fetches wanted versions into the store."""

    def __init__(
        self,
        cfg: CacheConfig,
        r: redis.Redis | None,
        keys: Keys,
        ctx: zmq.Context,
        parents: list[Parent],
        name: str,
        store: VersionStore,
        handoff: Handoff,
        counters: dict,
    ) -> None:
        self.cfg, self.r, self.keys, self.ctx, self.name = cfg, r, keys, ctx, name
        self.parents = parents
        self.store, self.handoff, self.counters = store, handoff, counters
        self.parent_index = 0
        self._heard_a_parent = False
        # Chunks from Redis skip redis-py (cache/rawget.py); only this thread reads with it.
        self._chunk_reader = ChunkReader.for_client(r) if r is not None else None

    def run(self, stop: threading.Event) -> None:
        """Follow parents until `stop`, failing over to the next one each time a parent is lost."""
        try:
            while not stop.is_set():
                parent = self.parents[self.parent_index]
                if parent.is_redis:  # each returns when the parent is lost or on stop
                    self._follow_redis(stop)
                else:
                    self._follow_node(parent, stop)
                if stop.is_set():
                    break
                self.parent_index = (self.parent_index + 1) % len(self.parents)
                self.counters["failovers_total"] += 1
                self.counters["parent"] = self.parents[self.parent_index].name
        finally:
            self.handoff.close_upstream_end()

    def close(self) -> None:
        """After the thread is done (the serve thread joins it first)."""
        if self._chunk_reader is not None:
            self._chunk_reader.close()

    # ---- what to fetch ------------------------------------------------------------------
    def _want_newer(self, version: Version) -> None:
        if self.store.claim_newer(version):
            self.handoff.want(version)

    def _drain_wanted(self, fetch: Fetch) -> None:
        """Fetch every wanted version, newest-first (stale intermediate ones are skipped)."""
        wanted = self.handoff.take_wanted()
        for version in sorted(wanted, reverse=True):
            try:
                ok = self._fetch_once(version, fetch)
            except ParentLost:
                # Ask again of the next parent; parked children keep waiting meanwhile (those
                # already streaming get an error and ask again).
                self.store.shm_abort(version)
                self.store.drop_partial(version)
                self.handoff.tell(Note.LOST, version)
                self.handoff.want_again(wanted)
                raise
            self.store.settle(version)
            self.handoff.tell(Note.LANDED if ok else Note.FAILED, version)
            wanted.discard(version)

    def _fetch_once(self, version: Version, fetch: Fetch) -> bool:
        """Hold `version` unless it is superseded and nobody waits for it; False if not held."""
        try:
            newest = self.store.newest()
            if self.store.holds(version):
                return True
            if newest is not None and version < newest and not self.handoff.waited(version):
                return False  # superseded before we got to it, and no child is waiting
            manifest, chunks = fetch(version)
            self.store.land(manifest, chunks)
            return True
        except (redis.RedisError, ProtocolError, zmq.ZMQError) as exc:
            self.counters["upstream_errors_total"] += 1
            self.counters["last_upstream_error"] = str(exc)[:200]
            self.store.shm_abort(version)
            return False

    def _add_chunk(self, manifest: blob.Manifest, chunk: bytes | memoryview) -> None:
        partial = self.store.append_chunk(manifest.version, chunk)
        self.handoff.tell(Note.CHUNK, manifest.version)  # the serve thread passes it on right away
        self.store.digest_chunk(manifest, partial, chunk)

    # ---- a Redis parent -----------------------------------------------------------------
    def _follow_redis(self, stop: threading.Event) -> None:
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
                        self.store.stage(version, "heard")
                        self._want_newer(version)
                        self._drain_wanted(self._fetch_redis)  # first, then the pointer
                    if time.monotonic() >= next_poll or self.handoff.has_wanted():
                        # Whatever woke us, the latest pointer is the truth (clone pattern).
                        latest = self.r.get(self.keys.model_latest)
                        if latest is not None:
                            self._want_newer(Version.parse(latest))
                        next_poll = time.monotonic() + self.cfg.poll_s
                    self._drain_wanted(self._fetch_redis)
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

    def _fetch_redis(self, version: Version) -> tuple[blob.Manifest, list]:
        """The manifest, then the chunks read into one buffer (cache/rawget.py); each is
        checked and passed on (and copied into the ring) while the next one arrives."""
        assert self.r is not None and self._chunk_reader is not None
        manifest = blob.read_manifest(self.r, self.keys, version)
        self.store.begin(manifest)
        keys = [self.keys.model_chunk(version, i) for i in range(manifest.chunks)]
        chunks: list = []
        with contextlib.closing(self._chunk_reader.read(keys, manifest.size, blob.CHUNK_BYTES)) as replies:
            for chunk in replies:
                blob.check_chunk(manifest, len(chunks), chunk)
                chunks.append(chunk)
                self._add_chunk(manifest, chunk)
        return manifest, chunks

    # ---- a node parent ------------------------------------------------------------------
    def _follow_node(self, parent: Parent, stop: threading.Event) -> None:
        link = NodeLink(self.ctx, parent)
        # A parent never heard from may still be starting (nodes of a tree start together).
        patience = self.cfg.parent_timeout_s if self._heard_a_parent else STARTUP_GRACE_S
        next_hb = 0.0
        try:
            while not stop.is_set():
                if link.sub.poll(50):
                    self._read_notifies(link)
                    if link.last_seq is not None:
                        self._heard_a_parent, patience = True, self.cfg.parent_timeout_s
                now = time.monotonic()
                if now - link.last_heard > patience:
                    return  # parent silent: fail over
                if now >= next_hb:
                    link.req.send_multipart(protocol.heartbeat(self.name))
                    next_hb = now + self.cfg.heartbeat_s
                self._drain_wanted(lambda version: self._fetch_node(link, version))
        except ParentLost:
            return
        finally:
            link.close()

    def _read_notifies(self, link: NodeLink) -> None:
        while True:
            try:
                notice = protocol.recv_notify(link.sub)
            except zmq.Again:
                return
            except ProtocolError:
                self.counters["rejected_total"] += 1
                continue
            if notice.arriving is not None:  # the parent is receiving it: ask now and get it streamed
                self.store.stage(notice.arriving, "heard")
                self._want_newer(notice.arriving)
            link.last_heard = time.monotonic()
            seq = notice.seq
            if link.last_seq is not None and seq > link.last_seq + 1:
                self.counters["missed_notifications_total"] += seq - link.last_seq - 1
            link.last_seq = seq if link.last_seq is None else max(link.last_seq, seq)
            if notice.version is not None:
                self._want_newer(notice.version)

    def _fetch_node(self, link: NodeLink, version: Version) -> tuple[blob.Manifest, list]:
        link.req.send_multipart(protocol.get(version))
        assembly, passed = protocol.Assembly(), 0
        deadline = time.monotonic() + self.cfg.request_timeout_s
        while time.monotonic() < deadline:
            wait_ms = 50
            while link.req.poll(wait_ms):  # wait for one message, then take all that queued
                wait_ms = 0
                assembly.feed(link.req.recv_multipart(copy=False))
                m = assembly.manifest
                if m is None:
                    continue
                if m.version != version:
                    assembly.reset()  # a late reply to an earlier request
                    continue
                if not passed:
                    self.store.begin(m)
                for chunk in assembly.chunks[passed:]:  # pass on the very buffers received
                    self._add_chunk(m, chunk)
                passed = len(assembly.chunks)
                deadline = time.monotonic() + self.cfg.request_timeout_s  # it is progressing
                if assembly.complete:
                    return m, assembly.chunks
            self._read_notifies(link)  # heartbeats keep arriving during a long transfer
            if time.monotonic() - link.last_heard > self.cfg.parent_timeout_s:
                raise ParentLost(f"parent went silent while sending {version}")
        link.redial()
        raise ProtocolError(f"parent did not send {version} within {self.cfg.request_timeout_s}s")
