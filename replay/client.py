"""Clients of the replay shards: actors insert chunks, learners stream sampled batches.

Actors talk to one shard, picked by a stable hash of their id. Learners talk to every
shard and keep several sample requests in flight on each, so a batch is usually already
waiting when the training step asks for it.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import xxhash
import zmq

from cluster import wire
from cluster.errors import DeadlineExceeded, ProtocolError

STOP_CHECK_S = 0.2  # how often a blocked insert looks at its stop event


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

    def __init__(self, endpoint: str, inflight: int, max_frame: int = 64 * 2**20, table: str | None = None):
        self.endpoint = endpoint
        self.table = table
        self.inflight_limit = inflight
        self.max_frame = max_frame
        self.sock = _dealer(zmq.Context.instance(), endpoint, max_frame)
        self.seq = itertools.count()
        self.inflight = 0
        self.errors_total = 0
        self.wait_s_total = 0.0

    def insert(
        self, arrays: dict[str, np.ndarray], timeout: float, stop: threading.Event | None = None
    ) -> None:
        """Queue one chunk; blocks (up to `timeout`) while the shard is `inflight` chunks behind.

        When `stop` is set during that wait the chunk is dropped and the call returns, so a
        stopping actor never hangs on a shard that is gone.
        """
        self._collect(block=False, timeout=0)
        if self.inflight >= self.inflight_limit:
            start = time.monotonic()
            deadline = start + timeout
            while self.inflight >= self.inflight_limit:
                if stop is not None and stop.is_set():
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DeadlineExceeded(
                        f"replay shard {self.endpoint} acknowledged nothing in {timeout:.0f}s"
                    )
                if self.sock.poll(int(min(remaining, STOP_CHECK_S) * 1000)):
                    self._collect(block=False, timeout=0)
            self.wait_s_total += time.monotonic() - start
        header = {"op": "insert", "req": next(self.seq), "n": len(next(iter(arrays.values())))}
        if self.table:
            header["table"] = self.table
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


@dataclass
class _Shard:
    sock: zmq.Socket
    ready: deque = field(default_factory=deque)  # decoded (header, arrays), at most `inflight`
    total: float = 0.0  # latest sampling-weight total the shard reported; 0: not sampleable now
    size: int = 0
    min_weight: float = 0.0
    heard: bool = False  # answered at least once: its total is known (0 when not ready)


class SampleClient:
    """Streams batches from every shard, `inflight` requests outstanding per shard.

    Global prioritisation: each batch comes whole from one shard, picked with probability
    total_s / sum(total) (the shard's share of total priority; its item count for uniform
    tables), so an item's chance to be in a batch is w_i / sum(total) whichever shard holds
    it. Every batch carries `shard`, `slot`, `gen` (its items' addresses for
    `update_priorities`), `prob` (global probability) and `weight` (importance weight
    (N P_i)^-beta normalised by the largest possible weight in the whole cluster), and
    `global_size` (N). beta anneals linearly from `is_exponent` to `is_exponent_final`.

    Example:
        sampler = SampleClient(["tcp://127.0.0.1:5555"], batch=256, inflight=4)
        arrays = sampler.next(timeout=30)  # dict of numpy arrays, plus slot/gen/weight
        sampler.update_priorities(arrays["shard"][0], arrays["slot"], arrays["gen"], td_abs)
    """

    def __init__(
        self,
        endpoints: list[str],
        batch: int,
        inflight: int,
        max_frame: int = 256 * 2**20,
        table: str | None = None,
        is_exponent: float = 0.4,
        is_exponent_final: float = 1.0,
        anneal_batches: int = 100_000,
        seed: int = 0,
    ):
        ctx = zmq.Context.instance()
        self.batch = batch
        self.max_frame = max_frame
        self.table = table
        self.beta0, self.beta1, self.anneal = is_exponent, is_exponent_final, max(1, anneal_batches)
        self.shards = [_Shard(_dealer(ctx, e, max_frame)) for e in endpoints]
        self.by_sock = {id(s.sock): i for i, s in enumerate(self.shards)}
        self.poller = zmq.Poller()
        for s in self.shards:
            self.poller.register(s.sock, zmq.POLLIN)
        self.req = itertools.count()
        self.rng = np.random.default_rng(seed)
        self.batches = 0
        self.not_ready_total = 0
        for s in self.shards:
            for _ in range(inflight):
                self._request(s.sock)

    @property
    def beta(self) -> float:
        frac = min(1.0, self.batches / self.anneal)
        return self.beta0 + (self.beta1 - self.beta0) * frac

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        """Endless batches for a training loop; each waits at most 60 s (DeadlineExceeded)."""
        while True:
            yield self.next(timeout=60.0)

    def next(self, timeout: float) -> dict[str, np.ndarray]:
        """The next batch, from a shard drawn by its share of total priority."""
        deadline = time.monotonic() + timeout
        self._receive(0)
        while True:
            totals = np.array([s.total for s in self.shards])
            # Global probabilities need every shard's total: wait until each has answered once.
            if totals.sum() > 0 and all(s.heard for s in self.shards):
                # The draw must not depend on which shard happens to have a batch ready.
                i = int(self.rng.choice(len(self.shards), p=totals / totals.sum()))
                shard = self.shards[i]
                while not shard.ready and shard.total > 0:
                    self._receive(self._remaining_ms(deadline, timeout))
                if shard.ready:
                    # Ask again only for what was consumed: requests in flight plus batches
                    # waiting stay at `inflight` per shard, so nothing is sampled unused
                    # (which would also fool the shard's samples-per-insert limiter).
                    self._request(shard.sock)
                    return self._finish(i, *shard.ready.popleft())
                continue  # the drawn shard went not-ready meanwhile: draw again
            self._receive(self._remaining_ms(deadline, timeout))  # nothing known yet

    def update_priorities(self, shard: int, slot: np.ndarray, gen: np.ndarray, priority: np.ndarray) -> None:
        """Send new priorities for items of one shard (fire-and-forget; stale ones are dropped there)."""
        arrays = {
            "slot": np.asarray(slot, np.int64),
            "gen": np.asarray(gen, np.int64),
            "priority": np.asarray(priority, np.float64),
        }
        header = {"op": "priority", "req": next(self.req), "noreply": True}
        if self.table:
            header["table"] = self.table
        self.shards[int(shard)].sock.send_multipart(wire.encode(header, arrays), copy=False)

    def close(self) -> None:
        for s in self.shards:
            s.sock.close(0)

    def _remaining_ms(self, deadline: float, timeout: float) -> int:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded(f"no replay batch within {timeout:.0f}s")
        return int(remaining * 1000) + 1

    def _receive(self, wait_ms: int) -> None:
        """Take every reply already queued (waiting up to `wait_ms` for the first one).

        Batches wait in their shard's `ready` queue; `next` re-requests when it consumes one.
        """
        for sock, _ in self.poller.poll(wait_ms):
            shard = self.shards[self.by_sock[id(sock)]]
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                msg = wire.decode(frames, self.max_frame)
                shard.heard = True
                if msg.op == "batch":
                    h = msg.header
                    shard.total, shard.size = float(h["total"]), int(h["size"])
                    shard.min_weight = float(h["min_weight"])
                    shard.ready.append((h, msg.arrays))
                elif msg.header.get("code") in ("not_ready", "busy"):
                    self._request(sock)  # nothing was delivered: keep the request count up
                    self.not_ready_total += 1
                    shard.total = 0.0  # held by its limiter: not drawn until it serves again
                else:
                    raise ProtocolError(f"replay shard refused a sample: {msg.header.get('message')}")

    def _finish(self, i: int, header: dict, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = dict(arrays)
        live = [s for s in self.shards if s.total > 0]
        total = sum(s.total for s in live)
        size = sum(s.size for s in live)
        # The item's own weight w_i = prob * (its shard's total when it was drawn).
        prob = arrays["prob"] * float(header["total"]) / total
        p_min = min(s.min_weight for s in live) / total
        beta = self.beta
        # (N P_i)^-beta / (N P_min)^-beta: N cancels; the largest weight belongs to P_min.
        out["prob"] = prob
        out["weight"] = (np.minimum(p_min / prob, 1.0) ** beta).astype(np.float32)
        out["shard"] = np.full(len(prob), i, np.int64)
        out["global_size"] = np.asarray(size, np.int64)
        self.batches += 1
        return out

    def _request(self, sock: zmq.Socket) -> None:
        header = {"op": "sample", "batch": self.batch, "req": next(self.req)}
        if self.table:
            header["table"] = self.table
        sock.send_multipart(wire.encode(header))


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
