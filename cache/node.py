"""Cache node: fetches each policy version from its parent once and serves it to children.

Middle of the model data flow: learner -> Redis root -> node -> ... -> node -> actors.
The parent is the Redis root or another node (the first reachable entry of `parents`);
children are nodes or actors, all speaking cache/protocol.py. A node is three parts and
two threads, and this module puts them together:

- cache/upstream.py, the upstream thread: follows the parent and fetches each version the
  tree wants exactly once, handing each checked chunk on as it arrives (cut-through);
- cache/store.py, between them: the versions held, arriving and asked for, and the host's
  shared-memory ring a leaf node (`shm_tag`) writes each version to;
- cache/serving.py, the serve thread (the caller of `serve`): answers and streams to
  children on the ROUTER and announces on the PUB.

The threads talk only through cache/handoff.py (wanted versions one way, a note per event
of a version's way in the other) and the store.

`counters["stages"]` holds unix times of the newest landed version's way through the
node (heard of it, manifest in, last chunk in, stored and in shared memory, announced):
the broadcast bench's per-stage breakdown.
"""

from __future__ import annotations

import threading
import time

import redis
import zmq

from canopy.cache.handoff import Handoff
from canopy.cache.serving import Server
from canopy.cache.store import VersionStore
from canopy.cache.upstream import Parent, Upstream
from canopy.config import CacheConfig
from canopy.keys import Keys
from canopy.version import Version


class CacheNode:
    """One cache node: its store, serve thread and upstream thread, wired together."""

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
        self.cfg, self.name = cfg, name
        parents = parents or [Parent()]
        if any(p.is_redis for p in parents) and r is None:
            raise ValueError("a node with the Redis root among its parents needs a Redis client")
        self.ctx = ctx or zmq.Context.instance()
        self.counters: dict = {
            "versions_fetched_total": 0,
            "upstream_fetches_total": 0,
            "upstream_bytes_total": 0,
            "served_bytes_total": 0,
            "fetch_requests_total": 0,
            "rejected_total": 0,
            "forbidden_total": 0,  # requests refused to the caller's role (CURVE keys on)
            "upstream_errors_total": 0,
            "missed_notifications_total": 0,
            "failovers_total": 0,
            "shm_skipped_total": 0,
            "children": 0,
            "parent": parents[0].name,
            "policy_version": "0.0",
            "stages": {},
        }
        self.store = VersionStore(cfg, shm_tag, self.counters)
        self.handoff = Handoff(self.ctx)
        self.server = Server(cfg, self.ctx, name, shm_tag, self.store, self.handoff, self.counters)
        self.upstream = Upstream(
            cfg, r, keys, self.ctx, parents, name, self.store, self.handoff, self.counters
        )

    def bind(self, fetch: str, notify: str) -> tuple[str, str]:
        """Bind the fetch ROUTER and the notify PUB; returns the endpoints bound (port 0 resolved)."""
        return self.server.bind(fetch, notify)

    def newest(self) -> Version | None:
        """The newest version held, or None before the first."""
        return self.store.newest()

    def serve(self, stop: threading.Event) -> None:
        """Run the serve thread here and the upstream thread beside it until `stop`."""
        upstream = threading.Thread(target=self.upstream.run, args=(stop,), daemon=True)
        upstream.start()
        poller = zmq.Poller()
        poller.register(self.server.fetch_sock, zmq.POLLIN)
        poller.register(self.handoff.wake, zmq.POLLIN)
        try:
            while not stop.is_set():
                events = dict(poller.poll(50))
                if self.handoff.wake in events:
                    for note, version in self.handoff.notes():
                        self.server.on_upstream(note, version)
                if self.server.fetch_sock in events:
                    self.server.take_requests()
                self.server.beat(time.monotonic())
        finally:
            upstream.join(timeout=5)
            self.upstream.close()
            self.handoff.close_serve_end()
            self.server.close()
            self.store.close()
