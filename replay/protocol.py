"""The replay shard's protocol: every op, its header fields and its limits, in one place.

Place in the data flow: actors' InsertClients (replay/insert.py), learners' SampleClients
(replay/sample.py) and one-off callers (replay/connect.py, replay/snapshot.py, the
launcher's cluster/report.py) build their request headers here; the shard
(replay/server.py) checks them here and builds its replies here. canopy/wire.py turns
headers and arrays into frames; this module never touches a socket.

Requests (every one may carry `req`, echoed in the reply, and `table`, MAIN when absent):
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
    priority {noreply?}                + slot (i8), gen (i8), priority (f8)
                                       -> updated {applied, dropped} (none with `noreply`)
    configure {samples_per_insert?, min_size?, error_buffer?} -> configured {limiter}
    snapshot                           -> snapshot {ok, seq, path, seconds, pause_ms (fork),
                                          request_max_ms (longest request served meanwhile)},
                                          sent when a snapshot that began after the request
                                          is on disk
    stats                              -> stats {...} (the shard's counters, flat)
Anything else, or anything malformed, gets `error {code, message}`: `bad_request`;
`busy` when too many requests are parked; `not_ready` for a sample the rate limiter held
past `replay.sample_wait_s`; `snapshots_off` for a snapshot without a directory;
`forbidden` for an op the caller's role may not use (ROLES, when the shard has CURVE keys).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np

from canopy.curve import ACTOR, LEARNER, OPERATOR
from canopy.errors import ProtocolError

MAIN = "main"  # the table of a request that names none
MAX_SAMPLE_ITEMS = 65536  # batch x batches of one sample request
MAX_LIMITER_VALUE = 1e15  # items: far beyond any table, far inside int64 and float precision
REPLY_MAX_FRAME = 2**20  # header-only replies (stats, snapshot): what a one-off caller accepts
INSERT_MAX_FRAME = 64 * 2**20  # an inserting client's default: acks are small
SAMPLE_MAX_FRAME = 256 * 2**20  # a sampling client's default: replies carry whole batches
LIMITER_FIELDS = ("samples_per_insert", "min_size", "error_buffer")  # configure's, and RateLimiter's
PRIORITY_ARRAYS = ("slot", "gen", "priority")
# Each sampled item's address and probability, after its columns in a batch reply.
ADDRESS: list[tuple[str, np.dtype, tuple[int, ...]]] = [
    ("slot", np.dtype(np.int64), ()),
    ("gen", np.dtype(np.int64), ()),
    ("prob", np.dtype(np.float64), ()),
]


class Op(StrEnum):
    """Request ops."""

    INSERT = "insert"
    SAMPLE = "sample"
    PRIORITY = "priority"
    CONFIGURE = "configure"
    SNAPSHOT = "snapshot"
    STATS = "stats"


# Who may use each op, by client role (canopy/curve.py): the shard refuses the rest.
ROLES: dict[str, frozenset[str]] = {
    Op.INSERT: frozenset({ACTOR}),
    Op.SAMPLE: frozenset({LEARNER}),
    Op.PRIORITY: frozenset({LEARNER}),
    Op.CONFIGURE: frozenset({OPERATOR}),
    Op.SNAPSHOT: frozenset({OPERATOR}),
    Op.STATS: frozenset({OPERATOR}),
}
CONNECT_ROLES = frozenset().union(*ROLES.values())  # who may connect at all (ZAP)
ZAP_DOMAIN = "replay"


class Reply(StrEnum):
    """Reply ops (snapshot and stats answer under their request's name)."""

    ACK = "ack"
    BATCH = "batch"
    UPDATED = "updated"
    CONFIGURED = "configured"
    SNAPSHOT = "snapshot"
    STATS = "stats"
    ERROR = "error"


class Code(StrEnum):
    """Error codes: machine-readable; the `message` beside them is for people."""

    BAD_REQUEST = "bad_request"
    BUSY = "busy"
    NOT_READY = "not_ready"
    SNAPSHOTS_OFF = "snapshots_off"
    FORBIDDEN = "forbidden"


# A sampler asks again after these: the shard is fine, its limiter or its queue is full.
RETRY = (Code.NOT_READY, Code.BUSY)


# -- requests: built by clients ---------------------------------------------------------


def insert_request(req: int, n: int, table: str | None = None) -> dict[str, Any]:
    """The header of an insert of `n` items (the chunk's arrays travel beside it)."""
    return _named({"op": Op.INSERT, "req": req, "n": n}, table)


def sample_request(
    batch: int,
    req: int,
    batches: int = 1,
    table: str | None = None,
    packed: bool = True,
    unique_frames: bool = True,
) -> dict[str, Any]:
    """A sample request: up to `batches` draws of `batch` items, in one reply."""
    header = {"op": Op.SAMPLE, "batch": batch, "req": req, "packed": packed, "unique_frames": unique_frames}
    if batches > 1:
        header["batches"] = batches
    return _named(header, table)


def priority_request(req: int, table: str | None = None, reply: bool = False) -> dict[str, Any]:
    """A priority update's header; without `reply` the shard sends no `updated`."""
    header: dict[str, Any] = {"op": Op.PRIORITY, "req": req}
    if not reply:
        header["noreply"] = True
    return _named(header, table)


def priority_arrays(slot: np.ndarray, gen: np.ndarray, priority: np.ndarray) -> dict[str, np.ndarray]:
    """A priority update's arrays, in the dtypes the shard takes."""
    return {
        "slot": np.asarray(slot, np.int64),
        "gen": np.asarray(gen, np.int64),
        "priority": np.asarray(priority, np.float64),
    }


def configure_request(req: int = 0, table: str | None = None, **limiter: float) -> dict[str, Any]:
    """New rate-limiter settings (any of LIMITER_FIELDS; the others stay)."""
    unknown = set(limiter) - set(LIMITER_FIELDS)
    if unknown:
        raise ValueError(f"configure takes {', '.join(LIMITER_FIELDS)}, not {', '.join(sorted(unknown))}")
    return _named({"op": Op.CONFIGURE, "req": req, **limiter}, table)


def snapshot_request(req: int = 0) -> dict[str, Any]:
    """Ask for a snapshot now; answered once one taken after it is on disk."""
    return {"op": Op.SNAPSHOT, "req": req}


def stats_request(req: int = 0) -> dict[str, Any]:
    """Ask for the shard's counters."""
    return {"op": Op.STATS, "req": req}


def one_off(header: Mapping[str, Any]) -> dict[str, Any]:
    """`header` as a one-off request (req 0), for a caller that holds a ready header (the
    launcher's report); ProtocolError when its op is none of the shard's."""
    if header.get("op") not in tuple(Op):
        raise ProtocolError(f"replay shards take no op {header.get('op')!r}")
    return {**header, "req": 0}


def _named(header: dict[str, Any], table: str | None) -> dict[str, Any]:
    if table:  # absent means MAIN: the header stays as short as before tables existed
        header["table"] = table
    return header


# -- requests: checked by the shard -----------------------------------------------------


def request_id(header: Mapping[str, Any]) -> Any:
    """The `req` to echo: whatever the client sent, None when it sent none."""
    return header.get("req")


def table_name(header: Mapping[str, Any]) -> Any:
    """The table a request names (not yet checked against the shard's)."""
    return header.get("table", MAIN)


@dataclass(frozen=True, slots=True)
class SampleRequest:
    """A checked sample request (see the table above)."""

    batch: int
    batches: int
    packed: bool
    unique_frames: bool


def parse_sample(header: Mapping[str, Any]) -> SampleRequest:
    """A checked sample request; ProtocolError names the bad field."""
    batch, batches = header.get("batch"), header.get("batches", 1)
    if not isinstance(batch, int) or not 0 < batch <= MAX_SAMPLE_ITEMS:
        raise ProtocolError(f"sample needs an integer 'batch' in 1..{MAX_SAMPLE_ITEMS}")
    if type(batches) is not int or not 0 < batches * batch <= MAX_SAMPLE_ITEMS:
        raise ProtocolError(f"sample: 'batches' x 'batch' must be an integer in 1..{MAX_SAMPLE_ITEMS}")
    packed, unique = header.get("packed", False), header.get("unique_frames", False)
    if not isinstance(packed, bool) or not isinstance(unique, bool):
        raise ProtocolError("sample: 'packed' and 'unique_frames' must be true or false")
    return SampleRequest(batch, batches, packed, unique)


def parse_priority(arrays: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(slot, gen, priority) of a priority update."""
    if set(arrays) != set(PRIORITY_ARRAYS):
        raise ProtocolError("priority update needs exactly the arrays slot, gen, priority")
    slot, gen, priority = (arrays[name] for name in PRIORITY_ARRAYS)
    if slot.dtype.kind not in "iu" or gen.dtype.kind not in "iu" or priority.dtype.kind != "f":
        raise ProtocolError("priority update: slot and gen must be integers, priority a float")
    return slot, gen, priority


def wants_reply(header: Mapping[str, Any]) -> bool:
    """Whether a priority update is answered (learners send theirs with `noreply`)."""
    return not header.get("noreply")


def parse_configure(header: Mapping[str, Any], current: Mapping[str, float]) -> dict[str, Any]:
    """The limiter settings a configure request asks for, `current` for those it leaves out,
    as RateLimiter's keyword arguments."""
    values = {key: header.get(key, current[key]) for key in LIMITER_FIELDS}
    for key, v in values.items():
        # Bounded too: the limiter's state goes back out in msgpack (64-bit at most).
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= MAX_LIMITER_VALUE:
            raise ProtocolError(f"configure: {key} must be a number in [0, {MAX_LIMITER_VALUE:g}]")
    if values["min_size"] < 1 or int(values["min_size"]) != values["min_size"]:
        raise ProtocolError("configure: min_size must be an integer >= 1")
    return {
        "samples_per_insert": float(values["samples_per_insert"]),
        "min_size": int(values["min_size"]),
        "error_buffer": float(values["error_buffer"]),
    }


# -- replies: built by the shard ---------------------------------------------------------


def answer(reply: dict[str, Any], req: Any) -> dict[str, Any]:
    """`reply` naming the request it answers."""
    reply["req"] = req
    return reply


def ack(size: int) -> dict[str, Any]:
    """The reply to an insert: the table's size after it."""
    return {"op": Reply.ACK, "size": size}


def batch_reply(size: int, total: float, min_weight: float, batches: int, req: Any) -> dict[str, Any]:
    """A batch reply's header (its arrays, or its packed frame, follow)."""
    header = {"op": Reply.BATCH, "size": size, "total": total, "min_weight": min_weight, "batches": batches}
    return answer(header, req)


def address(slot: np.ndarray, gen: np.ndarray, prob: np.ndarray) -> dict[str, np.ndarray]:
    """The sampled items' ADDRESS arrays of a batch reply."""
    return {"slot": slot, "gen": gen, "prob": prob}


def updated(applied: int, dropped: int) -> dict[str, Any]:
    """The reply to a priority update: how many applied and how many were dropped as stale."""
    return {"op": Reply.UPDATED, "applied": applied, "dropped": dropped}


def configured(limiter: dict[str, Any]) -> dict[str, Any]:
    """The reply to configure: the new limiter's view."""
    return {"op": Reply.CONFIGURED, "limiter": limiter}


def snapshot_reply(
    ok: bool, seq: int, path: str, seconds: float, pause_ms: float, request_max_ms: float
) -> dict[str, Any]:
    """The reply to a snapshot request: the snapshot's outcome and what it cost."""
    reply = {"op": Reply.SNAPSHOT, "ok": ok, "seq": seq, "path": path}
    reply.update(seconds=seconds, pause_ms=pause_ms, request_max_ms=request_max_ms)
    return reply


def stats_reply(counters: Mapping[str, Any]) -> dict[str, Any]:
    """The reply to stats: the shard's counters, flat."""
    return {"op": Reply.STATS, **counters}


def error(code: Code, message: str) -> dict[str, Any]:
    """An error reply (see Code)."""
    return {"op": Reply.ERROR, "code": code, "message": message}


# -- replies: read by clients ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BatchReply:
    """What a batch reply says besides its arrays: the table's size and sampling-weight total
    and smallest weight when it was drawn, and how many batches its rows hold."""

    size: int
    total: float
    min_weight: float
    batches: int


def parse_batch(header: Mapping[str, Any], asked: int) -> BatchReply:
    """A batch reply to a request for `asked` batches."""
    batches = header.get("batches", 1)
    if not isinstance(batches, int) or not 0 < batches <= asked:
        raise ProtocolError(f"replay shard sent {batches!r} batches for {asked} asked")
    return BatchReply(int(header["size"]), float(header["total"]), float(header["min_weight"]), batches)


def error_code(header: Mapping[str, Any]) -> Any:
    """The code of an error reply; None for any other reply."""
    return header.get("code") if header.get("op") == Reply.ERROR else None


def error_message(header: Mapping[str, Any]) -> str:
    """The message of an error reply (the whole header when it has none)."""
    return str(header.get("message", header))


def reply_fields(header: Mapping[str, Any]) -> dict[str, Any]:
    """A reply's own fields, without the request id it echoes."""
    return {k: v for k, v in header.items() if k != "req"}
