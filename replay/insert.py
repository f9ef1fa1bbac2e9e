"""Actors' side of replay: an InsertClient sends transition chunks to one shard.

Place in the data flow: an actor (actors/actor.py) hands its chunks to an InsertClient,
which writes to one shard, picked by rendezvous hashing of the actor id over the live
shards (replay/membership.py) and moved when that set changes. It takes either a fixed
endpoint (tests, benchmarks) or a `Members` view that follows Redis. Headers come from
replay/protocol.py; the shard's side is replay/server.py.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from canopy import wire
from canopy.errors import DeadlineExceeded, ProtocolError
from canopy.replay import protocol
from canopy.replay.connect import STOP_CHECK_S, dealer
from canopy.replay.membership import Members, shard_for

DRAIN_S = 5.0  # how long acks are still awaited from a live shard this client moved away from


@dataclass
class _Link:
    """The socket to one shard and the chunks it has not acknowledged yet.

    `monitor` reports the connection dropping: the shard process died (it may already be
    back on the same endpoint, still a member), and the chunks in flight died with it.
    """

    shard: int
    endpoint: str
    sock: zmq.Socket
    inflight: int = 0
    drain_until: float = 0.0
    monitor: zmq.Socket = field(init=False)

    def __post_init__(self) -> None:
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)

    def peer_lost(self) -> bool:
        """A disconnect was reported since the last call."""
        lost = False
        while self.monitor.poll(0):
            lost |= recv_monitor_message(self.monitor)["event"] == zmq.EVENT_DISCONNECTED
        return lost

    def close(self) -> None:
        self.sock.disable_monitor()
        self.monitor.close(0)
        self.sock.close(0)


class InsertClient:
    """Sends transition chunks to one shard with at most `inflight` unacknowledged.

    `target` is one endpoint, or a `Members` view: then the client writes to
    `shard_for(key, live shard ids)` and moves as soon as that answer changes (checked on
    every call, and every STOP_CHECK_S while a call waits). Chunks in flight when it moves:
    if the old shard is still live (a joining shard took this actor), its acks are awaited
    for DRAIN_S more; if it left or died they are dropped and counted in
    `chunks_dropped_total`, not resent: the dead shard's table is lost with it anyway, so
    a few chunks more change nothing for an off-policy learner, and a shard that only
    looked dead may have stored them (a resend would duplicate items).

    Example:
        client = InsertClient("tcp://127.0.0.1:5555", inflight=4)
        client = InsertClient(RedisMembers(r, keys, poll_s=1.0), inflight=4, key=actor_id)
        client.insert({"obs": obs, "action": actions, ...}, timeout=30)
    """

    def __init__(
        self,
        target: str | Members,
        inflight: int,
        max_frame: int = protocol.INSERT_MAX_FRAME,
        table: str | None = None,
        key: int = 0,
    ) -> None:
        self.members = Members([target]) if isinstance(target, str) else target
        self.key = key
        self.table = table
        self.inflight_limit = inflight
        self.max_frame = max_frame
        self.ctx = zmq.Context.instance()
        self.seq = itertools.count()
        self.link: _Link | None = None
        self.draining: list[_Link] = []
        self.generation = -1
        self.errors_total = 0
        self.wait_s_total = 0.0
        self.moves_total = 0
        self.chunks_dropped_total = 0
        self._follow()

    @property
    def shard(self) -> int | None:
        """The shard id written to now (None while no shard is live)."""
        return self.link.shard if self.link else None

    @property
    def endpoint(self) -> str | None:
        """The endpoint of that shard."""
        return self.link.endpoint if self.link else None

    @property
    def inflight(self) -> int:
        """Chunks the current shard has not acknowledged yet."""
        return self.link.inflight if self.link else 0

    def insert(
        self, arrays: dict[str, np.ndarray], timeout: float, stop: threading.Event | None = None
    ) -> None:
        """Queue one chunk; blocks (up to `timeout`) while the shard is `inflight` chunks behind.

        Also waits, within the same `timeout`, while no shard is live. When `stop` is set
        during a wait the chunk is dropped and the call returns, so a stopping actor never
        hangs on a shard that is gone.
        """
        self._follow()
        self._collect()
        if self.link is None or self.link.inflight >= self.inflight_limit:
            start = time.monotonic()
            deadline = start + timeout
            while self.link is None or self.link.inflight >= self.inflight_limit:
                if stop is not None and stop.is_set():
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DeadlineExceeded(self._stuck(timeout))
                self._wait(min(remaining, STOP_CHECK_S))
            self.wait_s_total += time.monotonic() - start
        header = protocol.insert_request(next(self.seq), len(next(iter(arrays.values()))), self.table)
        self.link.sock.send_multipart(wire.encode(header, arrays), copy=False)
        self.link.inflight += 1

    def flush(self, timeout: float) -> None:
        """Wait (up to `timeout`) until the current shard acknowledged every chunk."""
        deadline = time.monotonic() + timeout
        self._collect()
        while self.link is not None and self.link.inflight:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceeded(self._stuck(timeout))
            self._wait(min(remaining, STOP_CHECK_S))

    def close(self) -> None:
        """Close the sockets to the current shard and to those still draining."""
        for link in [self.link, *self.draining]:
            if link is not None:
                link.close()

    def _wait(self, seconds: float) -> None:
        """Wait for an ack (or sleep while no shard is live), then follow membership."""
        if self.link is not None:
            self.link.sock.poll(int(seconds * 1000))
        else:
            time.sleep(seconds)
        self._follow()
        self._collect()

    def _stuck(self, timeout: float) -> str:
        if self.link is None:
            return (
                f"no live replay shard for {timeout:.0f}s: start one (canopy replay --id N) "
                "or check that the shards reach Redis"
            )
        return f"replay shard {self.link.endpoint} acknowledged nothing in {timeout:.0f}s"

    def _follow(self) -> None:
        generation, live = self.members.view
        if generation == self.generation:
            return
        self.generation = generation
        shard = shard_for(self.key, live) if live else None
        old = self.link
        if old is not None and shard == old.shard and live[shard] == old.endpoint:
            return
        if old is not None:
            self.moves_total += 1
            if live.get(old.shard) == old.endpoint and old.inflight:
                old.drain_until = time.monotonic() + DRAIN_S
                self.draining.append(old)
            else:
                self.chunks_dropped_total += old.inflight
                old.close()
        self.link = None
        if shard is not None:
            self.link = _Link(shard, live[shard], dealer(self.ctx, live[shard], self.max_frame))

    def _collect(self) -> None:
        """Take every ack already queued, from the current shard and from those drained."""
        if self.link is not None:
            self._take(self.link)
            if self.link.peer_lost():
                # Restarted before it left membership: nothing will acknowledge those chunks.
                # A fresh socket starts at zero in flight instead of waiting out the timeout.
                old = self.link
                self.chunks_dropped_total += old.inflight
                old.close()
                self.link = _Link(old.shard, old.endpoint, dealer(self.ctx, old.endpoint, self.max_frame))
        now = time.monotonic()
        for link in list(self.draining):
            self._take(link)
            if not link.inflight or now > link.drain_until:
                self.chunks_dropped_total += link.inflight
                link.close()
                self.draining.remove(link)

    def _take(self, link: _Link) -> None:
        while link.inflight:
            try:
                frames = link.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            msg = wire.decode(frames, self.max_frame)
            link.inflight -= 1
            code = protocol.error_code(msg.header)
            if code is not None:
                self.errors_total += 1
                if code == protocol.Code.BAD_REQUEST:
                    message = protocol.error_message(msg.header)
                    raise ProtocolError(f"replay shard refused an insert: {message}")
