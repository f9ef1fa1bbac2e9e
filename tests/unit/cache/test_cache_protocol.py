"""cache/protocol.py's builders and checks: the header bytes every tier already speaks (the
expected ones are spelled out here, independently of the builders) and what the checks
refuse."""

from __future__ import annotations

import msgpack
import pytest
import zmq

from canopy import wire
from canopy.cache import protocol
from canopy.errors import ProtocolError
from canopy.version import Version


def header(fields: dict) -> bytes:
    return msgpack.packb({**fields, "arrays": []})


def test_requests_and_replies_keep_their_wire_bytes() -> None:
    assert protocol.hello() == [header({"op": "hello"})]
    assert protocol.get(Version(3, 7)) == [header({"op": "get", "version": "3.7"})]
    assert protocol.get("3.6") == [header({"op": "get", "version": "3.6"})]
    assert protocol.heartbeat("actor-2") == [header({"op": "hb", "child": "actor-2"})]
    reply = {"op": "hello", "version": "3.7", "seq": 4, "node": "n", "host": protocol.HOST}
    assert protocol.hello_reply(Version(3, 7), 4, "n", "ring", 2) == [
        header({**reply, "shm": "ring", "reader": 2})
    ]
    none = {**reply, "version": "", "shm": "", "reader": -1}
    assert protocol.hello_reply(None, 4, "n", "", -1) == [header(none)]
    error = {"op": "error", "code": "unknown_version", "message": "evicted"}
    assert protocol.error_reply(protocol.UNKNOWN_VERSION, "evicted") == [header(error)]


def test_notifications_keep_their_wire_bytes_and_topics() -> None:
    fields = {"op": "notify", "version": "1.2", "seq": 5, "node": "n", "host": protocol.HOST, "shm": "s"}
    assert protocol.notify(Version(1, 2), 5, "n", "s") == [b"b", header({**fields, "arriving": ""})]
    assert protocol.notify("1.2", 5, "n", "s", Version(1, 3)) == [b"a", header({**fields, "arriving": "1.3"})]
    landed = protocol.notify("1.2", 5, "n", "s", topic=protocol.TOPIC_LANDED)
    assert landed == [b"v", header({**fields, "arriving": ""})]
    beat = protocol.notify(None, 0, "n", "", topic=protocol.TOPIC_BEAT)
    assert beat[1] == header({**fields, "version": "", "seq": 0, "shm": "", "arriving": ""})


def test_a_notification_reads_back_as_a_notice() -> None:
    ctx = zmq.Context.instance()
    s, r = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        s.bind("inproc://protocol-notice-test")
        r.connect("inproc://protocol-notice-test")
        s.send_multipart(protocol.notify("1.2", 5, "n", "s", "1.3"))
        s.send_multipart(protocol.notify(None, 0, "n", "", topic=protocol.TOPIC_BEAT))
        assert r.poll(1000)
        assert protocol.recv_notify(r) == protocol.Notice(Version(1, 2), 5, protocol.HOST, "s", Version(1, 3))
        assert r.poll(1000)
        assert protocol.recv_notify(r) == protocol.Notice(None, 0, protocol.HOST, "", None)
        s.send_multipart([b"b", msgpack.packb({"op": "notify", "arriving": "not-a-version"})])
        assert r.poll(1000)
        with pytest.raises(ProtocolError):
            protocol.recv_notify(r)
    finally:
        s.close(0)
        r.close(0)


def test_a_hello_reply_reads_back_and_a_bad_one_is_refused() -> None:
    hello = protocol.read_hello(wire.decode(protocol.hello_reply(Version(2, 1), 3, "n", "ring", 7), 0))
    assert hello == protocol.Hello(Version(2, 1), protocol.HOST, "ring", 7)
    with pytest.raises(ProtocolError):
        protocol.read_hello(wire.Message({"op": "hello", "reader": "seven"}))
    with pytest.raises(ProtocolError):
        protocol.read_hello(wire.Message({"op": "hello", "shm": "x" * (protocol.MAX_FIELD_CHARS + 1)}))


def test_only_a_get_names_a_version_and_only_a_well_formed_one() -> None:
    assert protocol.requested_version(protocol.read_request(protocol.get("4.2"))) == Version(4, 2)
    for frames in (protocol.hello(), [msgpack.packb({"op": "put", "version": "4.2"})]):
        with pytest.raises(ProtocolError, match="unknown op"):
            protocol.requested_version(protocol.read_request(frames))
    with pytest.raises(ProtocolError):
        protocol.requested_version(protocol.read_request(protocol.get("latest")))


def test_only_a_nodes_children_may_ask_it_or_hear_it() -> None:
    from canopy import curve

    children = {curve.ACTOR, curve.EVALUATOR, curve.CACHE}
    ops = (protocol.HELLO, protocol.GET, protocol.LATEST, protocol.HB, protocol.SUBSCRIBE)
    assert set(protocol.ROLES) == set(ops)
    assert all(set(protocol.ROLES[op]) == children for op in ops)
    assert protocol.FETCH_ROLES == protocol.NOTIFY_ROLES == children
