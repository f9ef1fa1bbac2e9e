"""Replay shard server: a ZeroMQ ROUTER in front of named tables, each with a rate limiter.

Place in the data flow: actors' InsertClients send chunks here, learners' SampleClients
pull batches and send priority updates back; `canopy replay` (replay/role.py) runs one
server per shard and mirrors its counters into Redis.

Protocol (wire.py frames; every request may carry `req`, echoed in the reply, and
`table`, the main table when absent):
    insert {n}                         + arrays (+ optional float `priority`) -> ack {size}
    sample {batch}                     -> batch {size, total, min_weight} + arrays
                                          + slot, gen (item address), prob (within table)
    priority                           + slot (i8), gen (i8), priority (f8)
                                       -> updated {applied, dropped}
    configure {samples_per_insert?, min_size?, error_buffer?} -> configured {limiter}
    stats                              -> stats {...}
Anything malformed gets `error {code, message}` and bumps `rejected_total`; the shard keeps
serving. Requests the rate limiter holds back are parked per table (bounded in all by
`max_pending`) and answered as soon as they may proceed; parked samples time out with
`not_ready`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import zmq

from cluster import wire
from cluster.config import ReplayConfig
from cluster.errors import ProtocolError
from replay.limiter import RateLimiter
from replay.table import Table

MAIN = "main"


@dataclass
class _Parked:
    ident: bytes
    msg: wire.Message
    deadline: float


@dataclass
class _Slot:
    """A table with its limiter and its own parked queues (one table never blocks another)."""

    table: Table
    limiter: RateLimiter
    inserts: deque[_Parked] = field(default_factory=deque)
    samples: deque[_Parked] = field(default_factory=deque)


def table_specs(cfg: ReplayConfig) -> list[dict]:
    """The main table from the [replay] keys, then each `extra_tables` entry.

    An extra entry reads `name:sampler:remover[:max_times_sampled[:capacity]]`, e.g.
    `queue:fifo:fifo:1:10000` (a queue: each item is sampled once, oldest first).
    """
    specs = [
        dict(
            name=MAIN,
            sampler=cfg.sampler,
            remover=cfg.remover,
            max_times_sampled=cfg.max_times_sampled,
            capacity=cfg.capacity,
        )
    ]
    for entry in cfg.extra_tables:
        parts = entry.split(":")
        if not 3 <= len(parts) <= 5 or not parts[0] or parts[0] == MAIN:
            raise ValueError(
                f"replay.extra_tables entry {entry!r} must read name:sampler:remover"
                "[:max_times_sampled[:capacity]] with a name other than 'main'"
            )
        specs.append(
            dict(
                name=parts[0],
                sampler=parts[1],
                remover=parts[2],
                max_times_sampled=int(parts[3]) if len(parts) > 3 else 0,
                capacity=int(parts[4]) if len(parts) > 4 else cfg.capacity,
            )
        )
    return specs


class ReplayServer:
    """One shard. `bind` returns the bound endpoint (port 0 picks a free port, for tests).

    Example:
        server = ReplayServer(ReplayConfig(min_size=1))
        endpoint = server.bind("tcp://127.0.0.1:0")
        threading.Thread(target=server.serve, args=(stop,), daemon=True).start()
    """

    def __init__(self, cfg: ReplayConfig, seed: int = 0, ctx: zmq.Context | None = None):
        self.cfg = cfg
        self.tables: dict[str, _Slot] = {}
        specs = table_specs(cfg)
        for i, spec in enumerate(specs):
            table = Table(
                spec["capacity"],
                sampler=spec["sampler"],
                remover=spec["remover"],
                max_times_sampled=spec["max_times_sampled"],
                priority_exponent=cfg.priority_exponent,
                max_bytes=int(cfg.capacity_mb * 2**20 / len(specs)),  # the shard's budget, split
                name=spec["name"],
                seed=seed * 7919 + i,
            )
            limiter = RateLimiter(cfg.samples_per_insert, cfg.min_size, cfg.error_buffer)
            self.tables[spec["name"]] = _Slot(table, limiter)
        self.rng = np.random.default_rng(seed)
        self.max_frame = cfg.max_frame_mb * 2**20
        self.ctx = ctx or zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, self.max_frame)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.counters: dict[str, float | int | str] = {
            "inserts_total": 0,
            "samples_total": 0,
            "sample_requests_total": 0,
            "priority_updates_total": 0,
            "priority_updates_dropped_total": 0,
            "rejected_total": 0,
            "not_ready_total": 0,
            "items": 0,
            "bytes": 0,
            "limiter_diff": 0.0,
        }
        self._rate_mark = (time.monotonic(), 0, 0)

    @property
    def table(self) -> Table:
        """The main table (most deployments have only this one)."""
        return self.tables[MAIN].table

    @property
    def limiter(self) -> RateLimiter:
        return self.tables[MAIN].limiter

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

    # -- requests -------------------------------------------------------------------------

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
            elif op == "priority":
                self._update_priorities(ident, msg)
            elif op == "configure":
                self._configure(ident, msg)
            elif op == "stats":
                self._reply(ident, msg, {"op": "stats", **self.stats()})
            else:
                raise ProtocolError(f"unknown op {op!r}")
        except ProtocolError as exc:
            self._reject(ident, frames, str(exc))
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            # Input that slipped past the schema checks must not take the shard down.
            self._reject(ident, frames, f"malformed request ({type(exc).__name__}: {exc})"[:300])

    def _slot(self, msg: wire.Message) -> _Slot:
        name = msg.header.get("table", MAIN)
        slot = self.tables.get(name) if isinstance(name, str) else None
        if slot is None:
            raise ProtocolError(f"unknown table {name!r}: this shard has {', '.join(self.tables)}")
        return slot

    def _reject(self, ident: bytes, frames: list[zmq.Frame], reason: str) -> None:
        self.counters["rejected_total"] += 1
        req = wire.peek_req(frames[1]) if len(frames) > 1 else None
        self.sock.send_multipart([ident, *wire.error_reply("bad_request", reason, req=req)])

    def _parked_count(self) -> int:
        return sum(len(s.inserts) + len(s.samples) for s in self.tables.values())

    def _insert_or_park(self, ident: bytes, msg: wire.Message) -> None:
        slot = self._slot(msg)
        slot.table.check(msg.arrays)  # reject a bad chunk now, not after it waited in the queue
        if not slot.inserts and slot.limiter.can_insert():
            self._insert(slot, ident, msg)
        elif self._parked_count() < self.cfg.max_pending:
            slot.inserts.append(_Parked(ident, msg, 0.0))
        else:
            self._reply(ident, msg, _error("busy", "too many parked requests; retry later"))

    def _insert(self, slot: _Slot, ident: bytes, msg: wire.Message) -> None:
        n = slot.table.insert(msg.arrays)
        slot.limiter.inserted += n
        self.counters["inserts_total"] += n
        self._reply(ident, msg, {"op": "ack", "size": slot.table.size})

    def _sample_or_park(self, ident: bytes, msg: wire.Message) -> None:
        slot = self._slot(msg)
        if not slot.samples and self._can_sample(slot, msg):
            self._sample(slot, ident, msg)
        elif self._parked_count() < self.cfg.max_pending:
            slot.samples.append(_Parked(ident, msg, time.monotonic() + self.cfg.sample_wait_s))
        else:
            self._reply(ident, msg, _error("busy", "too many parked requests; retry later"))

    def _can_sample(self, slot: _Slot, msg: wire.Message) -> bool:
        return slot.table.size > 0 and slot.limiter.can_sample(slot.table.size, msg.header["batch"])

    def _sample(self, slot: _Slot, ident: bytes, msg: wire.Message) -> None:
        s = slot.table.sample(msg.header["batch"], self.rng)
        arrays = {**s.arrays, "slot": s.slots, "gen": s.gens, "prob": s.probs}
        n = len(s.slots)
        slot.limiter.sampled += n
        self.counters["samples_total"] += n
        header = {
            "op": "batch",
            "size": slot.table.size,
            "total": s.total,
            "min_weight": s.min_weight,
            "req": msg.header.get("req"),
        }
        self.sock.send_multipart([ident, *wire.encode(header, arrays)], copy=False)

    def _update_priorities(self, ident: bytes, msg: wire.Message) -> None:
        slot = self._slot(msg)
        a = msg.arrays
        if set(a) != {"slot", "gen", "priority"}:
            raise ProtocolError("priority update needs exactly the arrays slot, gen, priority")
        kinds = (a["slot"].dtype.kind, a["gen"].dtype.kind, a["priority"].dtype.kind)
        if kinds[0] not in "iu" or kinds[1] not in "iu" or kinds[2] != "f":
            raise ProtocolError("priority update: slot and gen must be integers, priority a float")
        applied = slot.table.update_priorities(a["slot"], a["gen"], a["priority"])
        dropped = len(a["slot"]) - applied
        self.counters["priority_updates_total"] += applied
        self.counters["priority_updates_dropped_total"] += dropped
        if not msg.header.get("noreply"):
            self._reply(ident, msg, {"op": "updated", "applied": applied, "dropped": dropped})

    def _configure(self, ident: bytes, msg: wire.Message) -> None:
        """Change a table's rate limiter at runtime; its insert/sample counts carry over."""
        slot = self._slot(msg)
        old = slot.limiter
        h = msg.header
        values = {
            "samples_per_insert": h.get("samples_per_insert", old.spi),
            "min_size": h.get("min_size", old.min_size),
            "error_buffer": h.get("error_buffer", old.max_diff - old.spi * old.min_size),
        }
        for key, v in values.items():
            if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
                raise ProtocolError(f"configure: {key} must be a number >= 0")
        if values["min_size"] < 1 or int(values["min_size"]) != values["min_size"]:
            raise ProtocolError("configure: min_size must be an integer >= 1")
        new = RateLimiter(
            float(values["samples_per_insert"]), int(values["min_size"]), float(values["error_buffer"])
        )
        new.inserted, new.sampled = old.inserted, old.sampled
        slot.limiter = new
        self._serve_parked()  # a looser limiter may free parked requests at once
        self._reply(ident, msg, {"op": "configured", "limiter": _limiter_view(new)})

    def _serve_parked(self) -> None:
        now = time.monotonic()
        for slot in self.tables.values():
            progress = True
            while progress:
                progress = False
                if slot.samples and self._can_sample(slot, slot.samples[0].msg):
                    p = slot.samples.popleft()
                    self._sample(slot, p.ident, p.msg)
                    progress = True
                if slot.inserts and slot.limiter.can_insert():
                    p = slot.inserts.popleft()
                    try:  # the table may have taken another signature while this chunk waited
                        self._insert(slot, p.ident, p.msg)
                    except ProtocolError as exc:
                        self.counters["rejected_total"] += 1
                        self._reply(p.ident, p.msg, _error("bad_request", str(exc)))
                    progress = True
            while slot.samples and slot.samples[0].deadline < now:
                p = slot.samples.popleft()
                self.counters["not_ready_total"] += 1
                self._reply(p.ident, p.msg, _error("not_ready", "rate limiter held the sample"))

    def _reply(self, ident: bytes, msg: wire.Message, header: dict) -> None:
        header["req"] = msg.header.get("req")
        self.sock.send_multipart([ident, *wire.encode(header)])

    # -- telemetry ------------------------------------------------------------------------

    def stats(self) -> dict:
        """Flat counters (the Redis stats hash): shard totals, then `<table>_<field>` per table."""
        now = time.monotonic()
        t0, ins0, smp0 = self._rate_mark
        if now - t0 >= 1.0:  # rates over the last second or more
            ins, smp = self.counters["inserts_total"], self.counters["samples_total"]
            self.counters["inserts_per_s"] = round((ins - ins0) / (now - t0), 1)
            self.counters["samples_per_s"] = round((smp - smp0) / (now - t0), 1)
            self._rate_mark = (now, ins, smp)
        main = self.tables[MAIN]
        self.counters.update(
            items=sum(s.table.size for s in self.tables.values()),
            bytes=sum(s.table.nbytes for s in self.tables.values()),
            limiter_diff=round(main.limiter.diff, 1),
            limiter_state=main.limiter.state(),
            parked=self._parked_count(),
            tables=",".join(self.tables),
        )
        for name, slot in self.tables.items():
            for key, value in {**slot.table.stats(), **_limiter_view(slot.limiter)}.items():
                self.counters[f"{name}_{key}"] = value
        return dict(self.counters)


def _limiter_view(lim: RateLimiter) -> dict:
    return {
        "limiter_state": lim.state(),
        "limiter_diff": round(lim.diff, 1),
        "samples_per_insert": lim.spi,
        "min_size": lim.min_size,
        "error_buffer": lim.max_diff - lim.spi * lim.min_size,
    }


def _error(code: str, message: str) -> dict:
    return {"op": "error", "code": code, "message": message}
