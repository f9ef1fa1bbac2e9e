"""Clients of the replay shards: actors insert chunks, learners stream sampled batches.

Actors talk to one shard, picked by a stable hash of their id. Learners talk to every
shard and keep several sample requests in flight on each, so a batch is usually already
waiting when the training step asks for it.
"""

from __future__ import annotations

import itertools
import time

import numpy as np
import xxhash
import zmq

from cluster import wire
from cluster.errors import DeadlineExceeded, ProtocolError


def shard_for(actor_id: int, shards: int) -> int:
    """Stable shard choice for an actor: the same id maps to the same shard on every host."""
    return xxhash.xxh64_intdigest(f"actor:{actor_id}".encode()) % shards


def _dealer(ctx: zmq.Context, endpoint: str, max_frame: int) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, max_frame)
    sock.connect(endpoint)
    return sock


class InsertClient:
    """Sends transition chunks to one shard with at most `inflight` unacknowledged.

    Example:
        client = InsertClient("tcp://127.0.0.1:5555", inflight=4)
        client.insert({"obs": obs, "action": actions, ...}, timeout=30)
    """

    def __init__(self, endpoint: str, inflight: int, max_frame: int = 64 * 2**20):
        self.endpoint = endpoint
        self.inflight_limit = inflight
        self.max_frame = max_frame
        self.sock = _dealer(zmq.Context.instance(), endpoint, max_frame)
        self.seq = itertools.count()
        self.inflight = 0
        self.errors_total = 0
        self.wait_s_total = 0.0

    def insert(self, arrays: dict[str, np.ndarray], timeout: float) -> None:
        """Queue one chunk; blocks (up to `timeout`) while the shard is `inflight` chunks behind."""
        self._collect(block=False, timeout=0)
        if self.inflight >= self.inflight_limit:
            start = time.monotonic()
            self._collect(block=True, timeout=timeout)
            self.wait_s_total += time.monotonic() - start
        header = {"op": "insert", "req": next(self.seq), "n": len(next(iter(arrays.values())))}
        self.sock.send_multipart(wire.encode(header, arrays), copy=False)
        self.inflight += 1

    def flush(self, timeout: float) -> None:
        while self.inflight:
            self._collect(block=True, timeout=timeout)

    def close(self) -> None:
        self.sock.close(0)

    def _collect(self, block: bool, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.inflight:
            wait_ms = max(0, int((deadline - time.monotonic()) * 1000)) if block else 0
            if not self.sock.poll(wait_ms):
                if block:
                    raise DeadlineExceeded(
                        f"replay shard {self.endpoint} acknowledged nothing in {timeout:.0f}s"
                    )
                return
            msg = wire.decode(self.sock.recv_multipart(), self.max_frame)
            self.inflight -= 1
            if msg.op == "error":
                self.errors_total += 1
                if msg.header.get("code") == "bad_request":
                    raise ProtocolError(f"replay shard refused an insert: {msg.header['message']}")
            block = False  # one reply frees a slot; take the rest only if already there


class SampleClient:
    """Streams batches from every shard, `inflight` requests outstanding per shard.

    Example:
        sampler = SampleClient(["tcp://127.0.0.1:5555"], batch=256, inflight=4)
        arrays = sampler.next(timeout=30)  # dict of numpy arrays, plus 'slot'
    """

    def __init__(self, endpoints: list[str], batch: int, inflight: int, max_frame: int = 256 * 2**20):
        ctx = zmq.Context.instance()
        self.batch = batch
        self.max_frame = max_frame
        self.socks = [_dealer(ctx, e, max_frame) for e in endpoints]
        self.poller = zmq.Poller()
        for s in self.socks:
            self.poller.register(s, zmq.POLLIN)
        self.req = itertools.count()
        self.not_ready_total = 0
        for s in self.socks:
            for _ in range(inflight):
                self._request(s)

    def next(self, timeout: float) -> dict[str, np.ndarray]:
        """The next sampled batch from whichever shard answers first."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceeded(f"no replay batch within {timeout:.0f}s")
            for sock, _ in self.poller.poll(int(remaining * 1000)):
                msg = wire.decode(sock.recv_multipart(copy=False), self.max_frame)
                self._request(sock)
                if msg.op == "batch":
                    return msg.arrays
                if msg.header.get("code") in ("not_ready", "busy"):
                    self.not_ready_total += 1
                    continue
                raise ProtocolError(f"replay shard refused a sample: {msg.header.get('message')}")

    def close(self) -> None:
        for s in self.socks:
            s.close(0)

    def _request(self, sock: zmq.Socket) -> None:
        sock.send_multipart(wire.encode({"op": "sample", "batch": self.batch, "req": next(self.req)}))


def request_stats(endpoint: str, timeout: float = 5.0) -> dict:
    """One-off stats request (used by tests and `canopy status`)."""
    sock = _dealer(zmq.Context.instance(), endpoint, 2**20)
    try:
        sock.send_multipart(wire.encode({"op": "stats", "req": 0}))
        if not sock.poll(int(timeout * 1000)):
            raise DeadlineExceeded(f"replay shard {endpoint} did not answer stats in {timeout}s")
        return wire.decode(sock.recv_multipart(), 2**20).header
    finally:
        sock.close(0)
