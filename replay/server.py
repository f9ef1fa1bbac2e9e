"""Replay shard server: a ZeroMQ ROUTER in front of named tables, each with a rate limiter.

Place in the data flow: actors' InsertClients (replay/insert.py) send chunks here,
learners' SampleClients (replay/sample.py) pull batches and send priority updates back;
`canopy replay` (replay/role.py) runs one server per shard and mirrors its counters into
Redis. Every op, its fields and its limits are in replay/protocol.py; requests are checked
and replies built there, and the tables live in replay/shard.py.

Pixel tables take `frame`, `frame_key`, `frame_prev` columns and frame keys as obs and
next_obs (replay/frames.py); their samples carry the rebuilt uint8 stacks.
Anything malformed gets `error {code, message}` and bumps `rejected_total`; the shard keeps
serving. With CURVE keys (canopy/curve.py) every request is also authorized by its
connection's role (protocol.ROLES): a refused one gets `forbidden` and bumps
`forbidden_total`. Requests the rate limiter holds back are parked per table (bounded in
all by `max_pending`) and answered as soon as they may proceed; parked samples time out
with `not_ready`.

Queue tables (replay/shard.py) use the same parking for backpressure instead of loss: a
chunk that does not fit beside the unread items waits until samples make room (its
actor's InsertClient then blocks at `inflight` unacknowledged chunks), and a sample waits
until the whole batch is there. Requests no queue could ever serve (a chunk or batch
larger than its capacity) are refused at once rather than parked for ever.

Snapshots (replay/snapshot.py), when a directory is given: at construction the shard loads
the newest valid snapshot there (tables, per-slot metadata, limiter state); then it forks
a writer every `snapshot_interval_s`, on request, and once more when `serve` stops.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from canopy import curve, wire
from canopy.config import ReplayConfig
from canopy.errors import ProtocolError
from canopy.replay import protocol, shard, snapshot
from canopy.replay.limiter import RateLimiter
from canopy.replay.packed import Columns
from canopy.replay.protocol import Code, Op, SampleRequest
from canopy.replay.shard import Parked, Slot
from canopy.replay.table import Table
from canopy.telemetry import rss_bytes, trim_heap

_SNDMORE = int(zmq.SNDMORE)
TRIM_EVERY_S = 10.0  # freed request buffers go back to the OS (canopy/telemetry.py: trim_heap)
FINAL_SNAPSHOT_TIMEOUT_S = 300.0  # a stopping shard waits this long for its last snapshot
_PARKED_FULL = "too many parked requests; retry later"


class ReplayServer:
    """One shard. `bind` returns the bound endpoint (port 0 picks a free port, for tests).

    Example:
        server = ReplayServer(ReplayConfig(min_size=1))
        endpoint = server.bind("tcp://127.0.0.1:0")
        threading.Thread(target=server.serve, args=(stop,), daemon=True).start()

    `snapshot_dir` (the shard's own, e.g. snapshot.shard_dir(cfg.snapshot_dir, id)) turns
    snapshots on; `restored` is then the path of the snapshot loaded at start, or None.
    """

    def __init__(
        self,
        cfg: ReplayConfig,
        seed: int = 0,
        ctx: zmq.Context | None = None,
        snapshot_dir: Path | None = None,
    ) -> None:
        self.cfg = cfg
        self.seed = seed
        self.tables = shard.build(cfg, seed)
        self.rng = np.random.default_rng(seed)
        self.max_frame = cfg.max_frame_mb * 2**20
        self.ctx = ctx or zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, self.max_frame)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.counters: dict[str, Any] = {
            "inserts_total": 0,
            "samples_total": 0,
            "sample_requests_total": 0,
            "priority_updates_total": 0,
            "priority_updates_dropped_total": 0,
            "rejected_total": 0,
            "forbidden_total": 0,  # ops refused to the caller's role (CURVE keys on)
            "not_ready_total": 0,
            "items": 0,
            "bytes": 0,
            "limiter_diff": 0.0,
        }
        self._handlers: dict[str, Callable[[bytes, wire.Message], None]] = {
            Op.INSERT: self._insert_or_park,
            Op.SAMPLE: self._sample_or_park,
            Op.PRIORITY: self._update_priorities,
            Op.CONFIGURE: self._configure,
            Op.SNAPSHOT: self._snapshot_request,
            Op.STATS: self._stats_request,
        }
        self._rate_mark = (time.monotonic(), 0, 0)
        self.gate: curve.Gate | None = None  # names each request's role when CURVE is on
        self.snaps: snapshot.Snapshotter | None = None
        self.restored: Path | None = None
        self.snapshot_waiters: list[tuple[bytes, wire.Message]] = []  # for the next snapshot
        self.snapshot_writing: list[tuple[bytes, wire.Message]] = []  # for the one being written
        self.snapshot_request_ms = 0.0  # longest request handled while the running one is written
        if snapshot_dir is not None:
            self.restored = snapshot.load_newest(snapshot_dir, self._accept_snapshot, snapshot.log)
            self.snaps = snapshot.Snapshotter(snapshot_dir)
            self.next_snapshot = time.monotonic() + cfg.snapshot_interval_s
            self.counters.update(snapshots_total=0, snapshot_failures_total=0, snapshot_pause_ms_max=0.0)

    @property
    def table(self) -> Table:
        """The main table (most deployments have only this one)."""
        return self.tables[protocol.MAIN].table

    @property
    def limiter(self) -> RateLimiter:
        """The main table's rate limiter."""
        return self.tables[protocol.MAIN].limiter

    def bind(self, endpoint: str) -> str:
        """Bind the ROUTER; returns the endpoint bound (port 0 resolved)."""
        self.gate = curve.bind(self.sock, endpoint, protocol.ZAP_DOMAIN, protocol.CONNECT_ROLES)
        return self.sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def serve(self, stop: threading.Event) -> None:
        """Serve requests until `stop`, then write a last snapshot (when on) and close the socket."""
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        next_stats = next_trim = 0.0
        while not stop.is_set():
            if poller.poll(50):
                # Drain what is queued before re-checking parked requests: fewer wake-ups.
                for _ in range(256):
                    try:
                        frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    if self.snaps is not None and self.snaps.running:  # what a snapshot costs
                        t0 = time.perf_counter()
                        self._handle(frames)
                        self.snapshot_request_ms = max(
                            self.snapshot_request_ms, (time.perf_counter() - t0) * 1e3
                        )
                    else:
                        self._handle(frames)
            self._serve_parked()
            if self.snaps is not None:
                self._snapshot_tick()
            if time.monotonic() > next_stats:  # keep the telemetry view of derived fields fresh
                self.stats()
                next_stats = time.monotonic() + 0.5
            if time.monotonic() > next_trim:
                trim_heap()
                next_trim = time.monotonic() + TRIM_EVERY_S
        if self.snaps is not None:
            self._final_snapshot()
        self.sock.close(0)

    # -- requests -------------------------------------------------------------------------

    def _handle(self, frames: list[zmq.Frame]) -> None:
        ident = frames[0].bytes
        try:
            role = self.gate.role_of(frames[1]) if self.gate is not None and len(frames) > 1 else None
            if self.gate is not None and role is None:
                self._forbid(ident, frames, "your key is no longer authorized")
                return
            msg = wire.decode(frames[1:], self.max_frame)
            handler = self._handlers.get(msg.op)
            if handler is None:
                raise ProtocolError(f"unknown op {msg.op!r}")
            if self.gate is not None and role not in protocol.ROLES[msg.op]:
                self._forbid(ident, frames, f"{msg.op} is not for the {role} role")
                return
            handler(ident, msg)
        except ProtocolError as exc:
            self._reject(ident, frames, str(exc))
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            # Input that slipped past the schema checks must not take the shard down.
            self._reject(ident, frames, f"malformed request ({type(exc).__name__}: {exc})"[:300])

    def _slot(self, msg: wire.Message) -> Slot:
        name = protocol.table_name(msg.header)
        slot = self.tables.get(name) if isinstance(name, str) else None
        if slot is None:
            raise ProtocolError(f"unknown table {name!r}: this shard has {', '.join(self.tables)}")
        return slot

    def _reject(self, ident: bytes, frames: list[zmq.Frame], reason: str) -> None:
        self.counters["rejected_total"] += 1
        self._error(ident, frames, Code.BAD_REQUEST, reason)

    def _forbid(self, ident: bytes, frames: list[zmq.Frame], reason: str) -> None:
        self.counters["forbidden_total"] += 1
        self._error(ident, frames, Code.FORBIDDEN, reason)

    def _error(self, ident: bytes, frames: list[zmq.Frame], code: Code, reason: str) -> None:
        req = wire.peek_req(frames[1]) if len(frames) > 1 else None
        reply = protocol.answer(protocol.error(code, reason), req)
        self.sock.send_multipart([ident, *wire.encode(reply)])

    def _parked_count(self) -> int:
        return sum(len(s.inserts) + len(s.samples) for s in self.tables.values())

    def _insert_or_park(self, ident: bytes, msg: wire.Message) -> None:
        slot = self._slot(msg)
        n = slot.table.check(msg.arrays)  # reject a bad chunk now, not after it waited in the queue
        if not slot.inserts and slot.admits(n):
            self._insert(slot, ident, msg)
        elif self._parked_count() < self.cfg.max_pending:
            slot.inserts.append(Parked(ident, msg, 0.0, n=n))
        else:
            self._reply(ident, msg, protocol.error(Code.BUSY, _PARKED_FULL))

    def _insert(self, slot: Slot, ident: bytes, msg: wire.Message) -> None:
        n = slot.table.insert(msg.arrays)
        slot.limiter.inserted += n
        self.counters["inserts_total"] += n
        self._reply(ident, msg, protocol.ack(slot.table.size))

    def _sample_or_park(self, ident: bytes, msg: wire.Message) -> None:
        want = protocol.parse_sample(msg.header)
        self.counters["sample_requests_total"] += 1
        slot = self._slot(msg)
        slot.check_batch(want.batch)
        if not slot.samples and slot.serves(want.batch):
            self._sample(slot, ident, msg, want)
        elif self._parked_count() < self.cfg.max_pending:
            deadline = time.monotonic() + self.cfg.sample_wait_s
            slot.samples.append(Parked(ident, msg, deadline, want))
        else:
            self._reply(ident, msg, protocol.error(Code.BUSY, _PARKED_FULL))

    def _sample(self, slot: Slot, ident: bytes, msg: wire.Message, want: SampleRequest) -> None:
        table = slot.table
        batches = max(1, slot.limiter.batches(table.size, want.batch, slot.most_batches(want)))
        slots, gens, probs, total, min_weight = table.draw(want.batch * batches, self.rng)
        n = len(slots)
        slot.limiter.sampled += n
        self.counters["samples_total"] += n
        req = protocol.request_id(msg.header)
        fields = protocol.batch_reply(table.size, total, min_weight, batches, req)
        address = protocol.address(slots, gens, probs)
        if want.packed:  # one frame, gathered in place (replay/packed.py)
            unique = want.unique_frames and table.frames is not None
            layout = slot.layouts.get(n, lambda: _packed_columns(table, n, unique), unique)
            buf = layout.acquire()
            views = buf.views
            table.gather(slots, views)
            for name, a in address.items():
                views[name][:] = a
            frames = table.gather_frames(slots, views, buf.frames) if unique else -1
            layout.send(self.sock, ident, fields, buf, frames)
            return
        out = [ident, *wire.encode(fields, {**table.gather(slots), **address})]
        send = self.sock.send  # int flags: send_multipart spends microseconds on enum arithmetic
        for frame in out[:-1]:
            send(frame, _SNDMORE, copy=False)
        send(out[-1], 0, copy=False)

    def _update_priorities(self, ident: bytes, msg: wire.Message) -> None:
        slot = self._slot(msg)
        slots, gens, priorities = protocol.parse_priority(msg.arrays)
        applied = slot.table.update_priorities(slots, gens, priorities)
        dropped = len(slots) - applied
        self.counters["priority_updates_total"] += applied
        self.counters["priority_updates_dropped_total"] += dropped
        if protocol.wants_reply(msg.header):
            self._reply(ident, msg, protocol.updated(applied, dropped))

    def _configure(self, ident: bytes, msg: wire.Message) -> None:
        """Change a table's rate limiter at runtime; its insert/sample counts carry over."""
        slot = self._slot(msg)
        if slot.table.is_queue:
            raise ProtocolError(f"table {slot.table.name!r} is a queue: its capacity alone limits it")
        old = slot.limiter
        new = RateLimiter(**protocol.parse_configure(msg.header, old.settings()))
        new.inserted, new.sampled = old.inserted, old.sampled
        slot.limiter = new
        self._serve_parked()  # a looser limiter may free parked requests at once
        self._reply(ident, msg, protocol.configured(new.view()))

    def _snapshot_request(self, ident: bytes, msg: wire.Message) -> None:
        if self.snaps is None:
            reply = protocol.error(Code.SNAPSHOTS_OFF, "set replay.snapshot_dir to take snapshots")
            self._reply(ident, msg, reply)
        elif len(self.snapshot_waiters) >= self.cfg.max_pending:
            reply = protocol.error(Code.BUSY, "too many snapshot requests waiting; retry later")
            self._reply(ident, msg, reply)
        else:  # answered by _snapshot_tick once a snapshot taken from now on is written
            self.snapshot_waiters.append((ident, msg))

    def _stats_request(self, ident: bytes, msg: wire.Message) -> None:
        self._reply(ident, msg, protocol.stats_reply(self.stats()))

    def _serve_parked(self) -> None:
        now = time.monotonic()
        for slot in self.tables.values():
            progress = True
            while progress:
                progress = False
                if slot.samples and slot.serves(slot.samples[0].sample.batch):
                    p = slot.samples.popleft()
                    self._sample(slot, p.ident, p.msg, p.sample)
                    progress = True
                if slot.inserts and slot.admits(slot.inserts[0].n):
                    p = slot.inserts.popleft()
                    try:  # the table may have taken another signature while this chunk waited
                        self._insert(slot, p.ident, p.msg)
                    except ProtocolError as exc:
                        self.counters["rejected_total"] += 1
                        self._reply(p.ident, p.msg, protocol.error(Code.BAD_REQUEST, str(exc)))
                    progress = True
            while slot.samples and slot.samples[0].deadline < now:
                p = slot.samples.popleft()
                self.counters["not_ready_total"] += 1
                reason = (
                    "fewer items than the batch" if slot.table.is_queue else "rate limiter held the sample"
                )
                self._reply(p.ident, p.msg, protocol.error(Code.NOT_READY, reason))

    def _reply(self, ident: bytes, msg: wire.Message, reply: dict[str, Any]) -> None:
        reply = protocol.answer(reply, protocol.request_id(msg.header))
        self.sock.send_multipart([ident, *wire.encode(reply)])

    # -- telemetry ------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Flat counters (the Redis stats hash): shard totals, then `<table>_<field>` per table."""
        now = time.monotonic()
        t0, ins0, smp0 = self._rate_mark
        if now - t0 >= 1.0:  # rates over the last second or more
            ins, smp = self.counters["inserts_total"], self.counters["samples_total"]
            self.counters["inserts_per_s"] = round((ins - ins0) / (now - t0), 1)
            self.counters["samples_per_s"] = round((smp - smp0) / (now - t0), 1)
            self._rate_mark = (now, ins, smp)
        main = self.tables[protocol.MAIN]
        self.counters.update(
            items=sum(s.table.size for s in self.tables.values()),
            bytes=sum(s.table.nbytes for s in self.tables.values()),
            limiter_diff=round(main.limiter.diff, 1),
            limiter_state=main.limiter.state(),
            parked=self._parked_count(),
            tables=",".join(self.tables),
        )
        for name, slot in self.tables.items():
            for key, value in {**slot.table.stats(), **slot.limiter.view()}.items():
                self.counters[f"{name}_{key}"] = value
        if self.gate is not None:  # clients whose key no allow-list of this shard holds
            self.counters["curve_refused_total"] = self.gate.refused_total
        self.counters["rss_bytes"] = rss = rss_bytes()
        if self.counters["items"]:  # the whole process, per stored item: what capacity planning needs
            self.counters["rss_bytes_per_item"] = round(rss / self.counters["items"], 1)
        return dict(self.counters)

    # -- snapshots ------------------------------------------------------------------------

    def snapshot_state(self) -> tuple[dict[str, Any], snapshot.Groups]:
        """Every table and limiter as (JSON state, arrays per table): what a snapshot holds."""
        return shard.export(self.tables)

    def _accept_snapshot(self, state: dict[str, Any], groups: snapshot.Groups) -> None:
        """Load a snapshot into fresh tables; nothing changes unless all of it loads."""
        self.tables = shard.load(self.cfg, self.seed, state, groups)

    def _snapshot_tick(self) -> None:
        outcome = self.snaps.poll()
        if outcome is not None:
            self._snapshot_done(outcome)
        if not self.snaps.running and (self.snapshot_waiters or time.monotonic() >= self.next_snapshot):
            self._start_snapshot()

    def _start_snapshot(self) -> None:
        self.snapshot_writing, self.snapshot_waiters = self.snapshot_waiters, []
        self.next_snapshot = time.monotonic() + self.cfg.snapshot_interval_s
        self.snaps.start(self.snapshot_state)
        self.snapshot_request_ms = 0.0
        self.counters["snapshot_pause_ms"] = round(self.snaps.pause_ms, 3)
        self.counters["snapshot_pause_ms_max"] = max(
            self.counters["snapshot_pause_ms_max"], self.snaps.pause_ms
        )

    def _snapshot_done(self, outcome: snapshot.Outcome) -> None:
        if outcome.ok:
            self.counters["snapshots_total"] += 1
            self.counters["snapshot_seq"] = outcome.seq
            self.counters["snapshot_seconds"] = round(outcome.seconds, 3)
        else:
            self.counters["snapshot_failures_total"] += 1
            snapshot.log(
                f"replay: snapshot {outcome.seq} failed (the writer's error is above); the previous one stays"
            )
        request_max_ms = round(self.snapshot_request_ms, 3)
        self.counters["snapshot_request_max_ms"] = request_max_ms
        reply = protocol.snapshot_reply(
            outcome.ok,
            outcome.seq,
            outcome.path,
            seconds=round(outcome.seconds, 3),
            pause_ms=round(outcome.pause_ms, 3),
            request_max_ms=request_max_ms,
        )
        for ident, msg in self.snapshot_writing:
            self._reply(ident, msg, dict(reply))
        self.snapshot_writing = []

    def _final_snapshot(self) -> None:
        """On stop (SIGTERM): finish the running snapshot, then write one of the final state."""
        if self.snaps.running and not self._finish_snapshot():
            return
        self._start_snapshot()
        self._finish_snapshot()

    def _finish_snapshot(self) -> bool:
        outcome = self.snaps.wait(FINAL_SNAPSHOT_TIMEOUT_S)
        if outcome is None:
            snapshot.log("replay: a snapshot did not finish in time; its writer goes on alone")
            return False
        self._snapshot_done(outcome)
        return True


def _packed_columns(table: Table, n: int, unique: bool) -> tuple[Columns, tuple[int, tuple[int, ...]] | None]:
    """A packed reply's columns: the table's, then each item's address and probability
    (which win over table columns of the same name, as in the unpacked reply). Unique-frame
    replies carry frame indexes instead of the stacks, and room for n items' frames."""
    names = {name for name, _, _ in protocol.ADDRESS}
    columns = [c for c in table.item_layout(unique) if c[0] not in names] + protocol.ADDRESS
    return columns, ((n * table.frames_per_item, table.frames.frame_shape) if unique else None)
