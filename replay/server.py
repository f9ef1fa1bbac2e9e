"""Replay shard server: a ZeroMQ ROUTER in front of named tables, each with a rate limiter.

Place in the data flow: actors' InsertClients send chunks here, learners' SampleClients
pull batches and send priority updates back; `canopy replay` (replay/role.py) runs one
server per shard and mirrors its counters into Redis.

Protocol (wire.py frames; every request may carry `req`, echoed in the reply, and
`table`, the main table when absent):
    insert {n}                         + arrays (+ optional float `priority`) -> ack {size}
    sample {batch, packed?, batches?, unique_frames?}
                                       -> batch {size, total, min_weight, batches} + arrays
                                          + slot, gen (item address), prob (within table);
                                          with `packed: true` all of them in one frame
                                          (replay/packed.py: `layout` + array `packed`);
                                          `batches` (default 1) asks for up to that many
                                          independent draws of `batch` items in one reply
                                          (rows batch after batch; the reply's `batches`
                                          says how many the rate limiter allowed, >= 1);
                                          `unique_frames` with `packed` on a pixel table:
                                          frames plus per-item frame indexes instead of
                                          whole stacks (replay/packed.py)
    priority                           + slot (i8), gen (i8), priority (f8)
                                       -> updated {applied, dropped}
    configure {samples_per_insert?, min_size?, error_buffer?} -> configured {limiter}
    snapshot                           -> snapshot {ok, seq, path, seconds, pause_ms (fork),
                                          request_max_ms (longest request served meanwhile)}, sent
                                          when a snapshot that began after the request is
                                          on disk (error `snapshots_off` without a directory)
    stats                              -> stats {...}
Pixel tables take `frame`, `frame_key`, `frame_prev` columns and frame keys as obs and
next_obs (replay/frames.py); their samples carry the rebuilt uint8 stacks.
Anything malformed gets `error {code, message}` and bumps `rejected_total`; the shard keeps
serving. Requests the rate limiter holds back are parked per table (bounded in all by
`max_pending`) and answered as soon as they may proceed; parked samples time out with
`not_ready`.

Snapshots (replay/snapshot.py), when a directory is given: at construction the shard loads
the newest valid snapshot there (tables, per-slot metadata, limiter state); then it forks
a writer every `snapshot_interval_s`, on request, and once more when `serve` stops.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zmq

from cluster import curve, wire
from cluster.config import ReplayConfig
from cluster.errors import ProtocolError
from cluster.telemetry import rss_bytes, trim_heap
from replay import snapshot
from replay.limiter import RateLimiter
from replay.packed import Columns, Layouts
from replay.table import Table

MAIN = "main"
MAX_LIMITER_VALUE = 1e15  # items: far beyond any table, far inside int64 and float precision
MAX_SAMPLE_ITEMS = 65536  # batch x batches of one sample request
_SNDMORE = int(zmq.SNDMORE)
TRIM_EVERY_S = 10.0  # freed request buffers go back to the OS (cluster/telemetry.py: trim_heap)
FINAL_SNAPSHOT_TIMEOUT_S = 300.0  # a stopping shard waits this long for its last snapshot
# Each sampled item's address and probability, after its columns in a packed reply.
_ADDRESS = [
    ("slot", np.dtype(np.int64), ()),
    ("gen", np.dtype(np.int64), ()),
    ("prob", np.dtype(np.float64), ()),
]


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
    layouts: Layouts = field(default_factory=Layouts)  # packed sample replies, by batch length


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

    `snapshot_dir` (the shard's own, e.g. snapshot.shard_dir(cfg.snapshot_dir, id)) turns
    snapshots on; `restored` is then the path of the snapshot loaded at start, or None.
    """

    def __init__(
        self,
        cfg: ReplayConfig,
        seed: int = 0,
        ctx: zmq.Context | None = None,
        snapshot_dir: Path | None = None,
    ):
        self.cfg = cfg
        self.seed = seed
        self.tables = self._build_tables()
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

    def _build_tables(self) -> dict[str, _Slot]:
        cfg = self.cfg
        tables: dict[str, _Slot] = {}
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
                seed=self.seed * 7919 + i,
                frame_stack=cfg.frame_stack,
                frame_window=cfg.frame_window,
            )
            limiter = RateLimiter(cfg.samples_per_insert, cfg.min_size, cfg.error_buffer)
            tables[spec["name"]] = _Slot(table, limiter)
        return tables

    @property
    def table(self) -> Table:
        """The main table (most deployments have only this one)."""
        return self.tables[MAIN].table

    @property
    def limiter(self) -> RateLimiter:
        return self.tables[MAIN].limiter

    def bind(self, endpoint: str) -> str:
        curve.bind(self.sock, endpoint)
        return self.sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def serve(self, stop: threading.Event) -> None:
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
            msg = wire.decode(frames[1:], self.max_frame)
            op = msg.op
            if op == "insert":
                self._insert_or_park(ident, msg)
            elif op == "sample":
                h = msg.header
                batch, batches = h.get("batch"), h.get("batches", 1)
                if not isinstance(batch, int) or not 0 < batch <= MAX_SAMPLE_ITEMS:
                    raise ProtocolError(f"sample needs an integer 'batch' in 1..{MAX_SAMPLE_ITEMS}")
                if type(batches) is not int or not 0 < batches * batch <= MAX_SAMPLE_ITEMS:
                    raise ProtocolError(
                        f"sample: 'batches' x 'batch' must be an integer in 1..{MAX_SAMPLE_ITEMS}"
                    )
                if not isinstance(h.get("packed", False), bool) or not isinstance(
                    h.get("unique_frames", False), bool
                ):
                    raise ProtocolError("sample: 'packed' and 'unique_frames' must be true or false")
                self.counters["sample_requests_total"] += 1
                self._sample_or_park(ident, msg)
            elif op == "priority":
                self._update_priorities(ident, msg)
            elif op == "configure":
                self._configure(ident, msg)
            elif op == "snapshot":
                if self.snaps is None:
                    self._reply(
                        ident, msg, _error("snapshots_off", "set replay.snapshot_dir to take snapshots")
                    )
                elif len(self.snapshot_waiters) >= self.cfg.max_pending:
                    self._reply(ident, msg, _error("busy", "too many snapshot requests waiting; retry later"))
                else:  # answered by _snapshot_tick once a snapshot taken from now on is written
                    self.snapshot_waiters.append((ident, msg))
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
        table = slot.table
        h = msg.header
        batch = h["batch"]
        # Several batches draw at once only where draws do not remove items; each is still
        # `batch` independent draws, as if asked for one after another with nothing between.
        most = h.get("batches", 1) if table.max_times_sampled == 0 else 1
        batches = max(1, slot.limiter.batches(table.size, batch, most))
        slots, gens, probs, total, min_weight = table.draw(batch * batches, self.rng)
        n = len(slots)
        slot.limiter.sampled += n
        self.counters["samples_total"] += n
        fields = {"op": "batch", "size": table.size, "total": total, "min_weight": min_weight}
        fields["batches"] = batches
        fields["req"] = h.get("req")
        if h.get("packed"):  # one frame, gathered in place (replay/packed.py)
            unique = bool(h.get("unique_frames")) and table.frames is not None
            layout = slot.layouts.get(n, lambda: _packed_columns(table, n, unique), unique)
            buf = layout.acquire()
            views = buf.views
            table.gather(slots, views)
            views["slot"][:] = slots
            views["gen"][:] = gens
            views["prob"][:] = probs
            frames = table.gather_frames(slots, views, buf.frames) if unique else -1
            layout.send(self.sock, ident, fields, buf, frames)
            return
        arrays = {**table.gather(slots), "slot": slots, "gen": gens, "prob": probs}
        frames = [ident, *wire.encode(fields, arrays)]
        send = self.sock.send  # int flags: send_multipart spends microseconds on enum arithmetic
        for frame in frames[:-1]:
            send(frame, _SNDMORE, copy=False)
        send(frames[-1], 0, copy=False)

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
            # Bounded too: the limiter's state goes back out in msgpack (64-bit at most).
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= MAX_LIMITER_VALUE:
                raise ProtocolError(f"configure: {key} must be a number in [0, {MAX_LIMITER_VALUE:g}]")
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
        self.counters["rss_bytes"] = rss = rss_bytes()
        if self.counters["items"]:  # the whole process, per stored item: what capacity planning needs
            self.counters["rss_bytes_per_item"] = round(rss / self.counters["items"], 1)
        return dict(self.counters)

    # -- snapshots ------------------------------------------------------------------------

    def snapshot_state(self) -> tuple[dict, snapshot.Groups]:
        """Every table and limiter as (JSON state, arrays per table): what a snapshot holds."""
        state: dict = {"tables": {}, "limiters": {}}
        groups: snapshot.Groups = {}
        for name, slot in self.tables.items():
            state["tables"][name], groups[name] = slot.table.export()
            lim = slot.limiter
            state["limiters"][name] = {
                "samples_per_insert": lim.spi,
                "min_size": lim.min_size,
                "error_buffer": lim.max_diff - lim.spi * lim.min_size,
                "inserted": lim.inserted,
                "sampled": lim.sampled,
            }
        return state, groups

    def _accept_snapshot(self, state: dict, groups: snapshot.Groups) -> None:
        """Load a snapshot into fresh tables; nothing changes unless all of it loads."""
        if not isinstance(state, dict) or not isinstance(state.get("tables"), dict):
            raise ValueError("its state is not a map of tables")
        if set(state["tables"]) != set(self.tables):
            raise ValueError(
                f"it holds tables {sorted(state['tables'])}, this shard has {sorted(self.tables)}"
            )
        fresh = self._build_tables()
        try:
            for name, slot in fresh.items():
                slot.table.load(state["tables"][name], groups.get(name, {}))
                lim = state["limiters"][name]
                slot.limiter = RateLimiter(
                    float(lim["samples_per_insert"]), int(lim["min_size"]), float(lim["error_buffer"])
                )
                slot.limiter.inserted, slot.limiter.sampled = int(lim["inserted"]), int(lim["sampled"])
        except (KeyError, TypeError, IndexError, AttributeError) as exc:
            raise ValueError(f"its state does not fit this shard ({type(exc).__name__}: {exc})") from None
        self.tables = fresh

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
        reply = {"op": "snapshot", "ok": outcome.ok, "seq": outcome.seq, "path": outcome.path}
        reply.update(seconds=round(outcome.seconds, 3), pause_ms=round(outcome.pause_ms, 3))
        reply["request_max_ms"] = round(self.snapshot_request_ms, 3)
        self.counters["snapshot_request_max_ms"] = reply["request_max_ms"]
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
    names = {name for name, _, _ in _ADDRESS}
    columns = [c for c in table.item_layout(unique) if c[0] not in names] + _ADDRESS
    return columns, ((n * table.frames_per_item, table.frames.frame_shape) if unique else None)


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
