"""The actor's side of the cache tree: keeps the newest version without ever blocking acting.

The leaves of the model data flow. `ClientCore` is one child of a leaf node as a plain
state machine over two sockets (no thread), so the broadcast benchmark can run thousands
of them per process; `ModelClient` runs one core in a background thread for an actor.

Per notification (or `hello` reply) naming a version newer than the one held: take it
from the host's shared-memory ring when the node is on this host (one copy per host,
read-only views, nothing but the notification crosses a socket), else `get` it over the
fetch socket, check payload and decoded digests (int8delta also needs its keyframe,
fetched first when missing), and hand it out. Versions only move forward, so an actor
never returns to an older epoch once it saw a newer one. A parent silent for
`parent_timeout_s` is replaced by the next entry of `parents`; meanwhile the actor keeps
acting with what it holds and `stale` says so.

Each core subscribes to its parent's landed (`v`) and beat (`b`) notifications, never to
`arriving` ones. A process that runs many cores on one host (the broadcast bench) may give
them one `HostWatch`: a single SUB to the leaf's landed notifications, whose news it hands
to each core in turn (`ClientCore.offer`), while each core's own SUB takes beats only. One
send per process instead of one per actor; each core still has its own sockets, its own
pin cells and its own sequence check, so a landed notification the watch missed is caught
by the core's next beat (a seq gap, then the version the beat names: the clone pattern).
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass

import numpy as np
import zmq

from canopy import curve
from canopy.cache import blob, protocol
from canopy.cache.shm import ShmReader
from canopy.config import CacheConfig, ClusterConfig
from canopy.errors import ProtocolError
from canopy.version import NO_VERSION, Version


@dataclass
class Update:
    """One version handed to the actor; unpacks as (version, manifest, arrays) for older callers."""

    version: Version
    manifest: blob.Manifest
    arrays: dict[str, np.ndarray]
    shared: bool  # views on the host's shared copy (read-only) rather than a private one

    def __iter__(self):  # `version, manifest, arrays = update` keeps working
        return iter((self.version, self.manifest, self.arrays))

    def __getitem__(self, i: int):
        return (self.version, self.manifest, self.arrays)[i]


class ClientCore:
    """One child of a cache node, driven by the caller's poller.

    Example:
        core = ClientCore([(fetch, notify)], ctx)
        core.connect()
        for sock in poller events: update = core.on_readable(sock)
        core.tick()  # heartbeats, timeouts, failover; call a few times a second
    """

    def __init__(
        self,
        parents: list[tuple[str, str]],
        ctx: zmq.Context,
        request_timeout_s: float = 5.0,
        parent_timeout_s: float = 1.0,
        heartbeat_s: float = 0.25,
        use_shm: bool = True,
        name: str = "actor",
        watch: HostWatch | None = None,
    ):
        if not parents:
            raise ValueError("a model client needs at least one parent node")
        self.parents, self.ctx, self.name = parents, ctx, name
        self.watch = watch
        self.request_timeout_s, self.parent_timeout_s, self.heartbeat_s = (
            request_timeout_s,
            parent_timeout_s,
            heartbeat_s,
        )
        self.use_shm = use_shm
        self.parent_index = 0
        self.current = NO_VERSION
        self.wanted: Version | None = None
        self.keyframe: tuple[Version, bytes] | None = None
        self.rejected_total = 0
        self.failovers_total = 0
        self.missed_notifications_total = 0
        self.sub: zmq.Socket | None = None
        self.req: zmq.Socket | None = None
        self.shm: ShmReader | None = None
        self._shm_offer: tuple[str, int] = ("", -1)
        self._sent_at: float | None = None
        self._asked: Version | None = None
        self._last_heard = time.monotonic()
        self._last_seq: int | None = None
        # Spread the first heartbeat over a period: actors started together (a host's worth)
        # would otherwise beat their node in one burst every period.
        self._next_hb = time.monotonic() + random.random() * heartbeat_s
        self._behind = False  # set at failover, cleared once the new parent's newest is held
        self._answered = False  # the parent answered our hello
        self.assembly = protocol.Assembly()  # the version reply streaming in, chunk by chunk

    @property
    def stale(self) -> bool:
        """True while the parent is silent: the version held may be behind the learner."""
        return self._behind or time.monotonic() - self._last_heard > self.parent_timeout_s

    @property
    def attached(self) -> bool:
        """The parent answered our hello and we heard one of its notifications."""
        return self._answered and self._last_seq is not None

    def sockets(self) -> tuple[zmq.Socket, zmq.Socket]:
        """The notify SUB and the fetch DEALER, for the caller's poller (after `connect`)."""
        assert self.sub is not None and self.req is not None
        return self.sub, self.req

    def connect(self) -> None:
        """Open both sockets to the current parent and send it hello."""
        fetch, notify = self.parents[self.parent_index]
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, protocol.TOPIC_BEAT)
        if not self.watched:  # else the process's HostWatch hears landed versions for us
            self.sub.setsockopt(zmq.SUBSCRIBE, protocol.TOPIC_LANDED)
        self.sub.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_NOTIFY_BYTES)
        curve.connect(self.sub, notify, curve.CACHE_SERVER)
        self.req = self._dealer(fetch)
        self.req.send_multipart(protocol.hello())
        self._sent_at, self._asked = time.monotonic(), None
        self._last_heard = time.monotonic()

    def close(self) -> None:
        """Close both sockets and the shared-memory reader."""
        for s in (self.sub, self.req):
            if s is not None:
                s.close(0)
        self.sub = self.req = None
        if self.shm is not None:
            self.shm.close()
            self.shm = None

    @property
    def watched(self) -> bool:
        """A HostWatch hears this core's current parent's landed versions for it."""
        return self.watch is not None and self.watch.notify == self.parents[self.parent_index][1]

    def offer(self, notice: protocol.Notice) -> Update | None:
        """A landed notification of this core's parent, heard by the process's HostWatch."""
        if not self.watched:
            return None
        self._note(notice)
        return self._consider(notice.version)

    def acting(self, version: Version) -> None:
        """The caller now acts with `version`: its shared slot must not be overwritten."""
        if self.shm is not None:
            self.shm.acting(version)

    def on_readable(self, sock: zmq.Socket) -> Update | None:
        """Handle what arrived on `sock`; an Update when a newer version is now held."""
        if sock is self.sub:
            return self._on_notify()
        if sock is self.req:
            return self._on_reply(self.req.recv_multipart(copy=False))
        return None

    def tick(self) -> None:
        """Fail over from a silent parent, re-send a timed-out request, send heartbeats."""
        now = time.monotonic()
        if now - self._last_heard > self.parent_timeout_s and len(self.parents) > 1:
            self.close_sockets()
            self.parent_index = (self.parent_index + 1) % len(self.parents)
            self.failovers_total += 1
            self._behind = True
            self.connect()
            return
        if self._sent_at is not None and now - self._sent_at > self.request_timeout_s:
            # Lazy pirate: drop the socket so a late reply cannot be mistaken for a new one.
            assert self.req is not None
            self.req.close(0)
            self.req = self._dealer(self.parents[self.parent_index][0])
            self._sent_at = None
            self._request_wanted()
        if now >= self._next_hb and self.req is not None:
            self.req.send_multipart(protocol.heartbeat(self.name))
            self._next_hb = now + self.heartbeat_s

    def close_sockets(self) -> None:
        """Close both sockets but keep the shared-memory reader (failover reconnects)."""
        for s in (self.sub, self.req):
            if s is not None:
                s.close(0)
        self.sub = self.req = None

    # ---- internals --------------------------------------------------------------------
    def _dealer(self, fetch: str) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_REPLY_BYTES)
        curve.connect(sock, fetch, curve.CACHE_SERVER)
        return sock

    def _on_notify(self) -> Update | None:
        assert self.sub is not None
        newest: Version | None = None
        while True:
            try:
                notice = protocol.recv_notify(self.sub)
            except zmq.Again:
                break
            except ProtocolError:
                self.rejected_total += 1
                continue
            self._note(notice)
            if notice.version is not None:
                newest = notice.version if newest is None else max(newest, notice.version)
        return self._consider(newest)

    def _note(self, notice: protocol.Notice) -> None:
        self._last_heard = time.monotonic()
        tag, reader = self._shm_offer
        if reader >= 0 and notice.shm and notice.shm != tag and notice.host == protocol.HOST:
            self._shm_offer = (notice.shm, reader)  # the ring may appear after hello
        seq = notice.seq
        if self._last_seq is not None and seq > self._last_seq + 1:
            self.missed_notifications_total += seq - self._last_seq - 1
        self._last_seq = seq if self._last_seq is None or seq > self._last_seq else self._last_seq

    def _consider(self, version: Version | None) -> Update | None:
        if version is None or version <= self.current:
            if version is not None:
                self._behind = False  # the (new) parent has nothing newer than what we hold
            return None
        if self.wanted is None or version > self.wanted:
            self.wanted = version
        update = self._from_shm(self.wanted)
        if update is not None:
            return update
        if self._sent_at is None:
            self._request_wanted()
        return None

    def _from_shm(self, version: Version) -> Update | None:
        tag, reader = self._shm_offer
        if not (self.use_shm and tag and reader >= 0):
            return None
        try:
            if self.shm is None or self.shm.tag != tag:
                if self.shm is not None:
                    self.shm.close()
                self.shm = ShmReader(tag, reader)
            got = self.shm.take(version)
        except (OSError, ProtocolError, ValueError):
            self.rejected_total += 1
            return None
        if got is None:
            return None
        manifest, arrays = got
        return self._accept(manifest, arrays, shared=True)

    def _request_wanted(self) -> None:
        if self.wanted is None or self.wanted <= self.current or self.req is None:
            return
        self.req.send_multipart(protocol.get(self.wanted))
        self._sent_at, self._asked = time.monotonic(), self.wanted

    def _on_reply(self, frames: list) -> Update | None:
        try:
            msg = protocol.read_reply(frames)
            if msg.op in (protocol.VERSION, protocol.CHUNK):
                self._sent_at = time.monotonic()  # the stream is progressing
                if not self.assembly.feed_message(msg):
                    return None
                manifest, chunks = self.assembly.manifest, self.assembly.chunks
                self.assembly.reset()
                self._sent_at = None
                assert manifest is not None
                return self._on_version(manifest, chunks)
            self._sent_at = None
            if msg.op == protocol.HELLO:
                self._last_heard = time.monotonic()
                self._answered = True
                hello = protocol.read_hello(msg)
                same_host = hello.host == protocol.HOST
                self._shm_offer = (hello.shm, hello.reader) if same_host and hello.reader >= 0 else ("", -1)
                return self._consider(hello.version)
            if msg.op == protocol.ERROR:
                self.assembly.reset()
                return None  # unknown_version: the next notification brings it
            raise ProtocolError(f"unexpected reply {msg.op!r}")
        except (ProtocolError, ValueError, TypeError, KeyError):
            self.rejected_total += 1
            self._sent_at = None
            return None
        finally:
            if self._sent_at is None:
                self._request_wanted()

    def _on_version(self, manifest: blob.Manifest, chunks: list) -> Update | None:
        base = None
        if manifest.codec == "int8delta":
            if self.keyframe is None or str(self.keyframe[0]) != manifest.base:
                # Fetch the keyframe first, then this version again.
                assert self.req is not None
                self.req.send_multipart(protocol.get(manifest.base))
                self._sent_at = time.monotonic()
                return None
            base = self.keyframe[1]
        decoded = blob.decode(manifest, chunks, base)
        if manifest.codec == "raw":
            self.keyframe = (manifest.version, decoded)
        if manifest.version <= self.current:
            return None
        return self._accept(manifest, blob.arrays_of(manifest, decoded), shared=False)

    def _accept(self, manifest: blob.Manifest, arrays: dict[str, np.ndarray], shared: bool) -> Update | None:
        if manifest.version <= self.current:
            return None
        self.current = manifest.version
        if self.wanted is None or self.wanted <= self.current:
            self.wanted = None
            self._behind = False
        return Update(manifest.version, manifest, arrays, shared)


class HostWatch:
    """One SUB to a node's landed notifications for every ClientCore of this process that
    follows that node. Example:

        watch = HostWatch(notify, ctx)
        cores = [ClientCore([(fetch, notify)], ctx, watch=watch) for _ in range(n)]
        for core in cores: watch.add(core); core.connect()
        updates = watch.on_readable()  # [(core, Update)] when watch.sub is readable
    """

    def __init__(self, notify: str, ctx: zmq.Context):
        self.notify = notify
        self.cores: list[ClientCore] = []
        self.rejected_total = 0
        self.sub = ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, protocol.TOPIC_LANDED)
        self.sub.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_NOTIFY_BYTES)
        curve.connect(self.sub, notify, curve.CACHE_SERVER)

    def add(self, core: ClientCore) -> None:
        """Offer this watch's landed notifications to `core` from now on."""
        self.cores.append(core)

    def on_readable(self) -> list[tuple[ClientCore, Update]]:
        """(core, Update) for each core that took a newer version from the queued notifications."""
        notes: list[protocol.Notice] = []
        while True:
            try:
                notes.append(protocol.recv_notify(self.sub))
            except zmq.Again:
                break
            except ProtocolError:
                self.rejected_total += 1
        updates = []
        for notice in notes:
            for core in self.cores:
                update = core.offer(notice)
                if update is not None:
                    updates.append((core, update))
        return updates

    def close(self) -> None:
        """Close the shared SUB (each core closes its own sockets)."""
        self.sub.close(0)


class ModelClient:
    """Example:
    client = ModelClient(fetch_endpoint, notify_endpoint)
    client.start()
    update = client.poll()  # None, or Update (unpacks as version, manifest, arrays)
    """

    def __init__(
        self,
        fetch: str,
        notify: str,
        request_timeout_s: float = 5.0,
        parents: list[tuple[str, str]] | None = None,
        parent_timeout_s: float = 1.0,
        heartbeat_s: float = 0.25,
        use_shm: bool = True,
        name: str = "actor",
    ):
        self.fetch_endpoint, self.notify_endpoint = fetch, notify
        self.core = ClientCore(
            [(fetch, notify), *(parents or [])],
            zmq.Context.instance(),
            request_timeout_s,
            parent_timeout_s,
            heartbeat_s,
            use_shm,
            name,
        )
        self._mailbox: Update | None = None
        self._ready = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="model-client", daemon=True)

    @property
    def current(self) -> Version:
        """The version held (NO_VERSION before the first)."""
        return self.core.current

    @property
    def rejected_total(self) -> int:
        """Messages and shared-memory slots refused as malformed or corrupt."""
        return self.core.rejected_total

    @property
    def stale(self) -> bool:
        """True while the parent is silent or a new parent's newest is not held yet."""
        return self.core.stale

    @property
    def failovers_total(self) -> int:
        """How many times the client moved to another parent."""
        return self.core.failovers_total

    def start(self) -> None:
        """Start the background thread that connects and fetches."""
        self._thread.start()

    def stop(self) -> None:
        """Stop the background thread (waits up to 2 s); its sockets close with it."""
        self._stop.set()
        self._thread.join(timeout=2)

    def poll(self) -> Update | None:
        """The newest version fetched since the last call, or None (never blocks)."""
        with self._ready:
            update, self._mailbox = self._mailbox, None
        if update is not None:
            self.core.acting(update.version)
        return update

    def wait(self, timeout: float) -> Update | None:
        """Like poll, but waits up to `timeout` seconds for a newer version."""
        with self._ready:
            self._ready.wait_for(lambda: self._mailbox is not None, timeout=timeout)
            update, self._mailbox = self._mailbox, None
        if update is not None:
            self.core.acting(update.version)
        return update

    def _run(self) -> None:
        core = self.core
        core.connect()
        try:
            while not self._stop.is_set():
                poller = zmq.Poller()
                for s in core.sockets():
                    poller.register(s, zmq.POLLIN)
                for sock, _ in poller.poll(100):
                    update = core.on_readable(sock)
                    if update is not None:
                        with self._ready:
                            self._mailbox = update
                            self._ready.notify_all()
                core.tick()
        finally:
            core.close()


def leaf_client(cluster: ClusterConfig, cache: CacheConfig, role: str, ident: int) -> ModelClient:
    """The started ModelClient of process `role ident`, attached to its leaf node (id mod nodes).

    Example:
        models = leaf_client(cfg.cluster, cfg.cache, "actor", 3)
    """
    node = ident % len(cluster.cache_fetch)
    client = ModelClient(
        cluster.cache_fetch[node],
        cluster.cache_notify[node],
        request_timeout_s=cache.request_timeout_s,
        parent_timeout_s=cache.parent_timeout_s,
        heartbeat_s=cache.heartbeat_s,
        use_shm=cache.shm,
        name=f"{role}-{ident}",
    )
    client.start()
    return client
