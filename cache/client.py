"""The actor's side of the cache tree: a background thread that keeps the newest version.

Acting never waits on a download: the thread subscribes to the leaf node's notifications,
fetches a version it does not have, checks the digest, and leaves the decoded arrays in a
one-slot mailbox that the acting loop empties with `poll()` between env steps. Versions
only move forward, so an actor never returns to an older epoch once it saw a newer one.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import zmq

from cache import blob
from cluster import wire
from cluster.errors import ProtocolError
from cluster.version import Version

MAX_REPLY_BYTES = blob.MAX_BLOB_BYTES


class ModelClient:
    """Example:
    client = ModelClient(fetch_endpoint, notify_endpoint)
    client.start()
    update = client.poll()  # None, or (Version, Manifest, {name: array})
    """

    def __init__(self, fetch: str, notify: str, request_timeout_s: float = 5.0):
        self.fetch_endpoint, self.notify_endpoint = fetch, notify
        self.request_timeout_s = request_timeout_s
        self.current = Version(0, 0)
        self.rejected_total = 0
        self._mailbox: tuple[Version, blob.Manifest, dict[str, np.ndarray]] | None = None
        self._ready = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="model-client", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def poll(self) -> tuple[Version, blob.Manifest, dict[str, np.ndarray]] | None:
        """The newest version fetched since the last call, or None (never blocks)."""
        with self._ready:
            update, self._mailbox = self._mailbox, None
        return update

    def wait(self, timeout: float) -> tuple[Version, blob.Manifest, dict[str, np.ndarray]] | None:
        """Like poll, but waits up to `timeout` seconds for a newer version."""
        with self._ready:
            self._ready.wait_for(lambda: self._mailbox is not None, timeout=timeout)
            update, self._mailbox = self._mailbox, None
        return update

    def _run(self) -> None:
        ctx = zmq.Context.instance()
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.setsockopt(zmq.MAXMSGSIZE, 4096)
        sub.connect(self.notify_endpoint)
        req = self._dealer(ctx)
        poller = zmq.Poller()
        poller.register(sub, zmq.POLLIN)
        poller.register(req, zmq.POLLIN)
        req.send_multipart(wire.encode({"op": "latest"}))
        sent_at: float | None = time.monotonic()
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(200))
                if sub in events:
                    wanted = self._newest_announced(sub)
                    if wanted is not None and wanted > self.current and sent_at is None:
                        req.send_multipart(wire.encode({"op": "get", "version": str(wanted)}))
                        sent_at = time.monotonic()
                if req in events:
                    self._receive(req.recv_multipart(copy=False))
                    sent_at = None
                elif sent_at is not None and time.monotonic() - sent_at > self.request_timeout_s:
                    # Lazy pirate: drop the socket so a late reply cannot be mistaken for a new one.
                    poller.unregister(req)
                    req.close(0)
                    req = self._dealer(ctx)
                    poller.register(req, zmq.POLLIN)
                    sent_at = None
        finally:
            sub.close(0)
            req.close(0)

    def _dealer(self, ctx: zmq.Context) -> zmq.Socket:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_REPLY_BYTES)
        sock.connect(self.fetch_endpoint)
        return sock

    def _newest_announced(self, sub: zmq.Socket) -> Version | None:
        newest = None
        while True:
            try:
                msg = wire.decode(sub.recv_multipart(zmq.NOBLOCK), 4096)
                v = Version.parse(str(msg.header.get("version", "")))
            except zmq.Again:
                return newest
            except ProtocolError:
                self.rejected_total += 1
                continue
            newest = v if newest is None else max(newest, v)

    def _receive(self, frames: list[zmq.Frame]) -> None:
        try:
            msg = wire.decode(frames, MAX_REPLY_BYTES)
            if msg.op != "version":
                return  # unknown_version: the next notification brings it
            manifest = blob.Manifest.from_fields(msg.header.get("manifest") or {})
            chunks = [msg.arrays[f"c{i}"].data for i in range(manifest.chunks)]
            arrays = blob.unpack(manifest, chunks)
        except (ProtocolError, KeyError):
            self.rejected_total += 1
            return
        if manifest.version <= self.current:
            return
        self.current = manifest.version
        with self._ready:
            self._mailbox = (manifest.version, manifest, arrays)
            self._ready.notify_all()
