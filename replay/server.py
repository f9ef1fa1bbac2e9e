"""Replay shard server: a ZeroMQ ROUTER in front of one table and its rate limiter.

Protocol (wire.py frames; every request may carry `req`, echoed in the reply):
    insert {n}            + arrays     -> ack {size}
    sample {batch}                     -> batch {size} + arrays (+ `slot`)
    stats                              -> stats {...}
Anything malformed gets `error {code, message}` and bumps `rejected_total`; the shard keeps
serving. Requests the rate limiter holds back are parked (bounded by `max_pending`) and
answered as soon as they may proceed; parked samples time out with `not_ready`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import zmq

from cluster import wire
from cluster.config import ReplayConfig
from cluster.errors import ProtocolError
from replay.limiter import RateLimiter
from replay.storage import Table


@dataclass
class _Parked:
    ident: bytes
    msg: wire.Message
    deadline: float


class ReplayServer:
    """One shard. `bind` returns the bound endpoint (port 0 picks a free port, for tests).

    Example:
        server = ReplayServer(ReplayConfig(min_size=1))
        endpoint = server.bind("tcp://127.0.0.1:0")
        threading.Thread(target=server.serve, args=(stop,), daemon=True).start()
    """

    def __init__(self, cfg: ReplayConfig, seed: int = 0, ctx: zmq.Context | None = None):
        self.cfg = cfg
        self.table = Table(cfg.capacity)
        self.limiter = RateLimiter(cfg.samples_per_insert, cfg.min_size, cfg.error_buffer)
        self.rng = np.random.default_rng(seed)
        self.max_frame = cfg.max_frame_mb * 2**20
        self.ctx = ctx or zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, self.max_frame)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.parked_inserts: deque[_Parked] = deque()
        self.parked_samples: deque[_Parked] = deque()
        self.counters = {
            "inserts_total": 0,
            "samples_total": 0,
            "sample_requests_total": 0,
            "rejected_total": 0,
            "not_ready_total": 0,
            "items": 0,
            "bytes": 0,
            "limiter_diff": 0.0,
        }

    def bind(self, endpoint: str) -> str:
        self.sock.bind(endpoint)
        return self.sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def serve(self, stop: threading.Event) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        next_stats = 0.0
        while not stop.is_set():
            if poller.poll(50):
                # Drain what is queued before re-checking parked requests: fewer wake-ups.
                for _ in range(256):
                    try:
                        frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._handle(frames)
            self._serve_parked()
            if time.monotonic() > next_stats:  # keep the telemetry view of derived fields fresh
                self.stats()
                next_stats = time.monotonic() + 0.5
        self.sock.close(0)

    def _handle(self, frames: list[zmq.Frame]) -> None:
        ident = frames[0].bytes
        try:
            msg = wire.decode(frames[1:], self.max_frame)
            op = msg.op
            if op == "insert":
                self._insert_or_park(ident, msg)
            elif op == "sample":
                batch = msg.header.get("batch")
                if not isinstance(batch, int) or not 0 < batch <= 65536:
                    raise ProtocolError("sample needs an integer 'batch' in 1..65536")
                self.counters["sample_requests_total"] += 1
                self._sample_or_park(ident, msg)
            elif op == "stats":
                self._reply(ident, msg, {"op": "stats", **self.stats()})
            else:
                raise ProtocolError(f"unknown op {op!r}")
        except ProtocolError as exc:
            self._reject(ident, frames, str(exc))
        except (ValueError, TypeError, KeyError) as exc:
            # Input that slipped past the schema checks must not take the shard down.
            self._reject(ident, frames, f"malformed request ({type(exc).__name__})")

    def _reject(self, ident: bytes, frames: list[zmq.Frame], reason: str) -> None:
        self.counters["rejected_total"] += 1
        req = wire.peek_req(frames[1]) if len(frames) > 1 else None
        self.sock.send_multipart([ident, *wire.error_reply("bad_request", reason, req=req)])

    def _insert_or_park(self, ident: bytes, msg: wire.Message) -> None:
        self.table.check(msg.arrays)  # reject a bad chunk now, not after it waited in the queue
        if not self.parked_inserts and self.limiter.can_insert():
            self._insert(ident, msg)
        elif len(self.parked_inserts) + len(self.parked_samples) < self.cfg.max_pending:
            self.parked_inserts.append(_Parked(ident, msg, 0.0))
        else:
            self._reply(ident, msg, _error("busy", "too many parked requests; retry later"))

    def _insert(self, ident: bytes, msg: wire.Message) -> None:
        n = self.table.insert(msg.arrays)
        self.limiter.inserted += n
        self.counters["inserts_total"] += n
        self._reply(ident, msg, {"op": "ack", "size": self.table.size})

    def _sample_or_park(self, ident: bytes, msg: wire.Message) -> None:
        if not self.parked_samples and self._can_sample(msg):
            self._sample(ident, msg)
        elif len(self.parked_inserts) + len(self.parked_samples) < self.cfg.max_pending:
            self.parked_samples.append(_Parked(ident, msg, time.monotonic() + self.cfg.sample_wait_s))
        else:
            self._reply(ident, msg, _error("busy", "too many parked requests; retry later"))

    def _can_sample(self, msg: wire.Message) -> bool:
        return self.limiter.can_sample(self.table.size, msg.header["batch"])

    def _sample(self, ident: bytes, msg: wire.Message) -> None:
        batch = msg.header["batch"]
        arrays, slots = self.table.sample(batch, self.rng)
        arrays["slot"] = slots
        self.limiter.sampled += batch
        self.counters["samples_total"] += batch
        header = {"op": "batch", "size": self.table.size, "req": msg.header.get("req")}
        self.sock.send_multipart([ident, *wire.encode(header, arrays)], copy=False)

    def _serve_parked(self) -> None:
        progress = True
        while progress:
            progress = False
            if self.parked_samples and self._can_sample(self.parked_samples[0].msg):
                p = self.parked_samples.popleft()
                self._sample(p.ident, p.msg)
                progress = True
            if self.parked_inserts and self.limiter.can_insert():
                p = self.parked_inserts.popleft()
                try:  # the table may have taken another signature while this chunk waited
                    self._insert(p.ident, p.msg)
                except ProtocolError as exc:
                    self.counters["rejected_total"] += 1
                    self._reply(p.ident, p.msg, _error("bad_request", str(exc)))
                progress = True
        now = time.monotonic()
        while self.parked_samples and self.parked_samples[0].deadline < now:
            p = self.parked_samples.popleft()
            self.counters["not_ready_total"] += 1
            self._reply(p.ident, p.msg, _error("not_ready", "rate limiter held the sample"))

    def _reply(self, ident: bytes, msg: wire.Message, header: dict) -> None:
        header["req"] = msg.header.get("req")
        self.sock.send_multipart([ident, *wire.encode(header)])

    def stats(self) -> dict:
        self.counters.update(
            items=self.table.size,
            bytes=self.table.nbytes,
            limiter_diff=round(self.limiter.diff, 1),
            limiter_state=self.limiter.state(),
            parked=len(self.parked_inserts) + len(self.parked_samples),
        )
        return dict(self.counters)


def _error(code: str, message: str) -> dict:
    return {"op": "error", "code": code, "message": message}
