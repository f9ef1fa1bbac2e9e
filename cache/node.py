"""Cache node: fetches each policy version from its parent once and serves it to children.

The parent is the Redis root: a thread listens on `model:notify` (and re-reads
`model:latest` every `poll_s`, so a missed notification costs at most one period),
fetches each new version once (single flight: one upstream fetcher), checks its digest,
and keeps the newest `keep_versions` in memory. Children see two sockets, as in the
zguide's clone pattern:
    notify (PUB):    {op: notify, version, seq}, on every new version and again each second
    fetch (ROUTER):  {op: latest} or {op: get, version} -> {op: version, manifest} + chunks
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

import numpy as np
import redis
import zmq

from cache import blob
from cluster import wire
from cluster.config import CacheConfig
from cluster.errors import ProtocolError
from cluster.keys import Keys
from cluster.version import Version

MAX_REQUEST_BYTES = 4096


class CacheNode:
    def __init__(self, cfg: CacheConfig, r: redis.Redis, keys: Keys, ctx: zmq.Context | None = None):
        self.cfg, self.r, self.keys = cfg, r, keys
        self.ctx = ctx or zmq.Context.instance()
        self.fetch_sock = self.ctx.socket(zmq.ROUTER)
        self.notify_sock = self.ctx.socket(zmq.PUB)
        for s in (self.fetch_sock, self.notify_sock):
            s.setsockopt(zmq.LINGER, 0)
        self.fetch_sock.setsockopt(zmq.MAXMSGSIZE, MAX_REQUEST_BYTES)
        self.versions: OrderedDict[Version, list] = OrderedDict()  # newest last; frames to send
        self.lock = threading.Lock()
        self.seq = 0
        self.counters = {
            "versions_fetched_total": 0,
            "fetch_requests_total": 0,
            "rejected_total": 0,
            "upstream_errors_total": 0,
            "policy_version": "0.0",
        }

    def bind(self, fetch: str, notify: str) -> tuple[str, str]:
        self.fetch_sock.bind(fetch)
        self.notify_sock.bind(notify)
        return (
            self.fetch_sock.getsockopt_string(zmq.LAST_ENDPOINT),
            self.notify_sock.getsockopt_string(zmq.LAST_ENDPOINT),
        )

    def serve(self, stop: threading.Event) -> None:
        wake = self.ctx.socket(zmq.PAIR)
        wake_addr = f"inproc://cache-wake-{id(self)}"
        wake.bind(wake_addr)
        upstream = threading.Thread(target=self._upstream, args=(stop, wake_addr), daemon=True)
        upstream.start()
        poller = zmq.Poller()
        poller.register(self.fetch_sock, zmq.POLLIN)
        poller.register(wake, zmq.POLLIN)
        next_announce = 0.0
        while not stop.is_set():
            events = dict(poller.poll(200))
            if wake in events:
                wake.recv()
                self._announce()
                next_announce = time.monotonic() + 1.0
            if self.fetch_sock in events:
                for _ in range(256):
                    try:
                        frames = self.fetch_sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._handle(frames)
            if time.monotonic() > next_announce:  # clone pattern: late joiners catch up
                self._announce()
                next_announce = time.monotonic() + 1.0
        upstream.join(timeout=2)
        wake.close(0)
        self.fetch_sock.close(0)
        self.notify_sock.close(0)

    def _announce(self) -> None:
        with self.lock:
            if not self.versions:
                return
            newest = next(reversed(self.versions))
        self.seq += 1
        self.notify_sock.send_multipart(
            wire.encode({"op": "notify", "version": str(newest), "seq": self.seq})
        )

    def _handle(self, frames: list[bytes]) -> None:
        ident = frames[0]
        self.counters["fetch_requests_total"] += 1
        try:
            msg = wire.decode(frames[1:], MAX_REQUEST_BYTES)
            with self.lock:
                if msg.op == "latest":
                    version = next(reversed(self.versions), None)
                elif msg.op == "get":
                    version = Version.parse(str(msg.header.get("version", "")))
                else:
                    raise ProtocolError(f"unknown op {msg.op!r}")
                reply = self.versions.get(version) if version else None
            if reply is None:
                self.fetch_sock.send_multipart(
                    [
                        ident,
                        *wire.error_reply("unknown_version", f"this node does not hold {version}"),
                    ]
                )
                return
            self.fetch_sock.send_multipart([ident, *reply], copy=False)
        except (ProtocolError, ValueError, TypeError, KeyError) as exc:
            # Input that slipped past the schema checks must not take the node down either.
            self.counters["rejected_total"] += 1
            self.fetch_sock.send_multipart([ident, *wire.error_reply("bad_request", str(exc))])

    def _upstream(self, stop: threading.Event, wake_addr: str) -> None:
        wake = self.ctx.socket(zmq.PAIR)
        wake.connect(wake_addr)
        pubsub = self.r.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(self.keys.model_notify)
            while not stop.is_set():
                try:
                    pubsub.get_message(timeout=self.cfg.poll_s)
                    # Whatever woke us, the latest pointer is the truth (clone pattern).
                    latest = self.r.get(self.keys.model_latest)
                    if latest is not None and self._fetch(Version.parse(latest)):
                        wake.send(b"")
                except (redis.RedisError, ProtocolError):
                    self.counters["upstream_errors_total"] += 1
                    stop.wait(self.cfg.poll_s)
        finally:
            pubsub.close()
            wake.close(0)

    def _fetch(self, version: Version) -> bool:
        with self.lock:
            if self.versions and version <= next(reversed(self.versions)):
                return False
        manifest, chunks = blob.read(self.r, self.keys, version)
        blob.unpack(manifest, chunks)  # digest check: never pass on a corrupt version
        frames = wire.encode(
            {"op": "version", "manifest": manifest.to_fields()},
            {f"c{i}": np.frombuffer(c, dtype=np.uint8) for i, c in enumerate(chunks)},
        )
        with self.lock:
            self.versions[version] = frames
            while len(self.versions) > self.cfg.keep_versions:
                self.versions.popitem(last=False)
        self.counters["versions_fetched_total"] += 1
        self.counters["policy_version"] = str(version)
        return True
