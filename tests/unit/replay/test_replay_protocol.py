"""replay/protocol.py: the headers it builds are the ones on the wire before it existed, its
checks refuse what the shard must refuse, and it is the only replay module that spells an op."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

from canopy.errors import ProtocolError
from canopy.replay import client, connect, insert, protocol, sample
from canopy.replay.protocol import MAX_LIMITER_VALUE, MAX_SAMPLE_ITEMS, Code, Op, Reply

REPLAY = Path(__file__).resolve().parents[3] / "replay"


@pytest.mark.parametrize(
    "built,literal",
    [
        (protocol.insert_request(3, 16), {"op": "insert", "req": 3, "n": 16}),
        (protocol.insert_request(3, 16, table="q"), {"op": "insert", "req": 3, "n": 16, "table": "q"}),
        (
            protocol.sample_request(256, 7),
            {"op": "sample", "batch": 256, "req": 7, "packed": True, "unique_frames": True},
        ),
        (
            protocol.sample_request(32, 8, batches=3, table="q"),
            {
                "op": "sample",
                "batch": 32,
                "req": 8,
                "packed": True,
                "unique_frames": True,
                "batches": 3,
                "table": "q",
            },
        ),
        (protocol.priority_request(5), {"op": "priority", "req": 5, "noreply": True}),
        (protocol.priority_request(5, table="q", reply=True), {"op": "priority", "req": 5, "table": "q"}),
        (protocol.configure_request(2, min_size=5), {"op": "configure", "req": 2, "min_size": 5}),
        (protocol.snapshot_request(), {"op": "snapshot", "req": 0}),
        (protocol.stats_request(), {"op": "stats", "req": 0}),
        (protocol.one_off({"op": "snapshot"}), {"op": "snapshot", "req": 0}),
        (protocol.answer(protocol.ack(8), 41), {"op": "ack", "size": 8, "req": 41}),
        (
            protocol.batch_reply(10, 2.5, 0.5, 2, 4),
            {"op": "batch", "size": 10, "total": 2.5, "min_weight": 0.5, "batches": 2, "req": 4},
        ),
        (protocol.updated(3, 1), {"op": "updated", "applied": 3, "dropped": 1}),
        (protocol.configured({"min_size": 5}), {"op": "configured", "limiter": {"min_size": 5}}),
        (protocol.stats_reply({"items": 4}), {"op": "stats", "items": 4}),
        (
            protocol.error(Code.NOT_READY, "rate limiter held the sample"),
            {"op": "error", "code": "not_ready", "message": "rate limiter held the sample"},
        ),
    ],
)
def test_built_headers_are_the_same_bytes_as_the_literal_ones(built: dict, literal: dict) -> None:
    assert built == literal
    assert msgpack.packb(built) == msgpack.packb(literal)  # field order and types included


def test_every_op_reply_and_code_is_spelled_as_before() -> None:
    assert [*Op] == ["insert", "sample", "priority", "configure", "snapshot", "stats"]
    assert [*Reply] == ["ack", "batch", "updated", "configured", "snapshot", "stats", "error"]
    assert [*Code] == ["bad_request", "busy", "not_ready", "snapshots_off", "forbidden"]


def test_a_sample_request_reads_with_its_defaults() -> None:
    want = protocol.parse_sample({"op": "sample", "batch": 8})
    assert (want.batch, want.batches, want.packed, want.unique_frames) == (8, 1, False, False)
    want = protocol.parse_sample(protocol.sample_request(8, 1, batches=4))
    assert (want.batch, want.batches, want.packed, want.unique_frames) == (8, 4, True, True)


@pytest.mark.parametrize(
    "fields,match",
    [
        ({}, "batch"),
        ({"batch": 0}, "batch"),
        ({"batch": "8"}, "batch"),
        ({"batch": MAX_SAMPLE_ITEMS + 1}, "batch"),
        ({"batch": 256, "batches": 257}, "batches"),
        ({"batch": 8, "batches": True}, "batches"),
        ({"batch": 8, "packed": 1}, "packed"),
        ({"batch": 8, "unique_frames": "yes"}, "unique_frames"),
    ],
)
def test_a_bad_sample_request_is_refused(fields: dict[str, Any], match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        protocol.parse_sample({"op": "sample", **fields})


CURRENT = {"samples_per_insert": 2.0, "min_size": 10, "error_buffer": 100.0}


def test_configure_keeps_what_it_does_not_name() -> None:
    got = protocol.parse_configure({"op": "configure", "min_size": 5}, CURRENT)
    assert got == {"samples_per_insert": 2.0, "min_size": 5, "error_buffer": 100.0}
    assert isinstance(got["min_size"], int) and isinstance(got["error_buffer"], float)


@pytest.mark.parametrize(
    "fields",
    [
        {"min_size": 0},
        {"min_size": 2.5},
        {"samples_per_insert": True},
        {"samples_per_insert": -1},
        {"error_buffer": MAX_LIMITER_VALUE * 10},
        {"error_buffer": float("nan")},
        {"error_buffer": "big"},
    ],
)
def test_configure_refuses_settings_outside_the_limits(fields: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError, match="configure"):
        protocol.parse_configure({"op": "configure", **fields}, CURRENT)


def test_configure_request_names_only_limiter_settings() -> None:
    with pytest.raises(ValueError, match="batch"):
        protocol.configure_request(batch=3)


def test_a_priority_update_needs_its_three_arrays_in_the_right_kinds() -> None:
    arrays = protocol.priority_arrays([1, 2], [3, 4], [0.5, 1.5])
    assert [a.dtype for a in arrays.values()] == [np.int64, np.int64, np.float64]
    slot, gen, priority = protocol.parse_priority(arrays)
    assert slot.tolist() == [1, 2] and priority.tolist() == [0.5, 1.5]
    with pytest.raises(ProtocolError, match="exactly"):
        protocol.parse_priority({"slot": slot, "gen": gen})
    with pytest.raises(ProtocolError, match="integers"):
        protocol.parse_priority({**arrays, "slot": slot.astype(np.float32)})


def test_a_batch_reply_may_hold_fewer_batches_than_asked_never_more() -> None:
    header = protocol.batch_reply(10, 2.5, 0.5, 2, 4)
    assert protocol.parse_batch(header, asked=3) == protocol.BatchReply(10, 2.5, 0.5, 2)
    with pytest.raises(ProtocolError, match="2 batches for 1 asked"):
        protocol.parse_batch(header, asked=1)


def test_error_replies_are_told_apart_from_the_rest() -> None:
    busy = protocol.answer(protocol.error(Code.BUSY, "retry later"), 3)
    assert protocol.error_code(busy) in protocol.RETRY
    assert protocol.error_message(busy) == "retry later"
    assert protocol.error_code(protocol.ack(1)) is None
    assert protocol.reply_fields(busy) == {"op": "error", "code": "busy", "message": "retry later"}


def test_a_one_off_request_of_an_unknown_op_is_refused_before_it_is_sent() -> None:
    with pytest.raises(ProtocolError, match="explode"):
        protocol.one_off({"op": "explode"})


def test_the_old_client_module_names_the_same_objects() -> None:
    assert client.InsertClient is insert.InsertClient
    assert client.SampleClient is sample.SampleClient
    assert client.request_stats is connect.request_stats


def _spelled_ops(path: Path) -> list[str]:
    """Dict literals with an `op` or `code` key, and comparisons with an op or code string."""
    names = {*Op, *Reply, *Code}
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Dict):
            keys = [k.value for k in node.keys if isinstance(k, ast.Constant)]
            out += [f"{path.name}:{node.lineno}: {{{k!r}: ...}}" for k in keys if k in ("op", "code")]
        elif isinstance(node, ast.Compare):
            for c in [node.left, *node.comparators]:
                if isinstance(c, ast.Constant) and c.value in names:
                    out.append(f"{path.name}:{node.lineno}: compares with {c.value!r}")
    return out


def test_no_replay_module_but_the_protocol_spells_an_op() -> None:
    found = [f for p in sorted(REPLAY.glob("*.py")) if p.name != "protocol.py" for f in _spelled_ops(p)]
    assert not found, found


def test_every_op_has_the_roles_issue_22_gives_it() -> None:
    from canopy import curve

    assert set(protocol.ROLES) == set(Op)  # a new op cannot ship without deciding who may use it
    assert {op: set(roles) for op, roles in protocol.ROLES.items()} == {
        Op.INSERT: {curve.ACTOR},
        Op.SAMPLE: {curve.LEARNER},
        Op.PRIORITY: {curve.LEARNER},
        Op.CONFIGURE: {curve.OPERATOR},
        Op.SNAPSHOT: {curve.OPERATOR},
        Op.STATS: {curve.OPERATOR},
    }
    assert {curve.ACTOR, curve.LEARNER, curve.OPERATOR} == protocol.CONNECT_ROLES
