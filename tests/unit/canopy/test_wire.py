"""canopy/wire.py: header + raw array frames, and every way a peer can send garbage."""

from __future__ import annotations

import contextlib

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from canopy import wire
from canopy.errors import ProtocolError

MAX_FRAME = 1 << 20


def frames_with(header: object, *payloads: bytes) -> list[bytes]:
    return [msgpack.packb(header), *payloads]


ROUND_TRIP_CASES = [
    pytest.param({}, id="header-only"),
    pytest.param({"obs": np.arange(12, dtype=np.float32).reshape(3, 4)}, id="f4-matrix"),
    pytest.param(
        {
            "obs": np.random.default_rng(0).normal(size=(5, 2, 3)).astype(np.float64),
            "action": np.arange(5, dtype=np.int64),
            "done": np.array([True, False, True, False, False]),
            "pixels": np.arange(24, dtype=np.uint8).reshape(2, 3, 4),
            "half": np.linspace(0, 1, 7, dtype=np.float16),
            "small": np.array([-3, 4], dtype=np.int8),
            "u16": np.array([1, 65535], dtype=np.uint16),
            "u64": np.array([2**63 + 5], dtype=np.uint64),
        },
        id="mixed-dtypes-and-ranks",
    ),
    pytest.param({"scalar": np.array(2.5, dtype=np.float32)}, id="zero-dim"),
    pytest.param({"t": np.arange(20, dtype=np.int32).reshape(4, 5).T}, id="non-contiguous-input"),
    # encode's own frames are documented input to decode (see wire._buffer); an empty
    # array must survive that round trip like any other.
    pytest.param({"none": np.zeros((0, 3), dtype=np.float32)}, id="empty-array"),
]


@pytest.mark.parametrize("arrays", ROUND_TRIP_CASES)
def test_decode_of_encode_returns_the_same_header_and_arrays(arrays: dict[str, np.ndarray]) -> None:
    header = {"op": "insert", "req": 7, "n": 3, "note": "hi"}

    msg = wire.decode(wire.encode(header, arrays), MAX_FRAME)

    assert msg.op == "insert"
    assert msg.header == header
    assert list(msg.arrays) == list(arrays)
    for name, original in arrays.items():
        got = msg.arrays[name]
        assert got.dtype == original.dtype
        assert got.shape == original.shape
        np.testing.assert_array_equal(got, original)


def test_round_trip_through_a_real_zeromq_socket_pair_keeps_every_array() -> None:
    ctx = zmq.Context.instance()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.setsockopt(zmq.LINGER, 0)
        b.setsockopt(zmq.LINGER, 0)
        port = a.bind_to_random_port("tcp://127.0.0.1")
        b.connect(f"tcp://127.0.0.1:{port}")
        arrays = {
            "obs": np.random.default_rng(1).normal(size=(64, 4)).astype(np.float32),
            "action": np.arange(64, dtype=np.int64),
            "empty": np.zeros((0, 4), dtype=np.float32),
        }
        a.send_multipart(wire.encode({"op": "insert", "n": 64}, arrays), copy=False)
        assert b.poll(5000), "no message within 5 s"
        msg = wire.decode(b.recv_multipart(copy=False), MAX_FRAME)
    finally:
        a.close(0)
        b.close(0)
    assert msg.header == {"op": "insert", "n": 64}
    for name, original in arrays.items():
        np.testing.assert_array_equal(msg.arrays[name], original)
        assert msg.arrays[name].dtype == original.dtype


def test_arrays_decoded_from_received_bytes_are_read_only_views() -> None:
    frames = [bytes(f) for f in wire.encode({"op": "x"}, {"a": np.zeros(4, np.float32)})]
    msg = wire.decode(frames, MAX_FRAME)
    with pytest.raises(ValueError):
        msg.arrays["a"][0] = 1.0


GOOD_SPEC = ["a", "<f4", [2]]
EIGHT_BYTES = b"\x00" * 8

REJECT_CASES = [
    pytest.param([], id="no-frames"),
    pytest.param([b"\xc1\xc1\xc1garbage"], id="garbage-header-bytes"),
    pytest.param([msgpack.packb({"op": "x"}) + b"\x00"], id="trailing-bytes-after-header"),
    pytest.param([b"\x00" * (wire.MAX_HEADER_BYTES + 1)], id="oversize-header"),
    pytest.param(frames_with([1, 2, 3]), id="header-is-a-list"),
    pytest.param(frames_with("insert"), id="header-is-a-string"),
    pytest.param(frames_with({"req": 1}), id="missing-op"),
    pytest.param(frames_with({"op": 5}), id="op-not-a-string"),
    pytest.param([msgpack.packb({1: "x", "op": "x"}, strict_types=False)], id="non-string-map-key"),
    pytest.param(frames_with({"op": "x", "arrays": [GOOD_SPEC]}), id="spec-but-no-frame"),
    pytest.param(frames_with({"op": "x"}, EIGHT_BYTES), id="frame-but-no-spec"),
    pytest.param(frames_with({"op": "x", "arrays": [GOOD_SPEC]}, EIGHT_BYTES, EIGHT_BYTES), id="extra-frame"),
    pytest.param(frames_with({"op": "x", "arrays": "a"}, EIGHT_BYTES), id="arrays-not-a-list"),
    pytest.param(frames_with({"op": "x", "arrays": [["a", "<f4"]]}, EIGHT_BYTES), id="spec-too-short"),
    pytest.param(frames_with({"op": "x", "arrays": [[1, "<f4", [2]]]}, EIGHT_BYTES), id="name-not-str"),
    pytest.param(frames_with({"op": "x", "arrays": [["a" * 65, "<f4", [2]]]}, EIGHT_BYTES), id="long-name"),
    pytest.param(frames_with({"op": "x", "arrays": [["a", "|O", [1]]]}, EIGHT_BYTES), id="object-dtype"),
    pytest.param(frames_with({"op": "x", "arrays": [["a", "<U4", [1]]]}, b"\x00" * 16), id="unicode-dtype"),
    pytest.param(frames_with({"op": "x", "arrays": [["a", "<c8", [1]]]}, EIGHT_BYTES), id="complex-dtype"),
    pytest.param(frames_with({"op": "x", "arrays": [["a", "V8", [1]]]}, EIGHT_BYTES), id="void-dtype"),
    pytest.param(frames_with({"op": "x", "arrays": [["a", 5, [2]]]}, EIGHT_BYTES), id="dtype-an-int"),
    pytest.param(frames_with({"op": "x", "arrays": [["a", "<f4", [-2]]]}, EIGHT_BYTES), id="negative-dim"),
    pytest.param(frames_with({"op": "x", "arrays": [["a", "<f4", 2]]}, EIGHT_BYTES), id="shape-not-list"),
    pytest.param(frames_with({"op": "x", "arrays": [["a", "<f4", [1] * 9]]}, b"\x00" * 4), id="rank-9"),
    pytest.param(frames_with({"op": "x", "arrays": [["a", "<f4", [3]]]}, EIGHT_BYTES), id="too-few-bytes"),
    pytest.param(frames_with({"op": "x", "arrays": [["a", "<f4", [1]]]}, EIGHT_BYTES), id="too-many-bytes"),
    pytest.param(
        frames_with({"op": "x", "arrays": [["a", "<f4", [1]]] * (wire.MAX_ARRAYS + 1)}),
        id="too-many-arrays",
    ),
    # Hostile specs that once slipped past the checks with a non-ProtocolError:
    pytest.param(frames_with({"op": "x", "arrays": [["a", ["<f4"], [2]]]}, EIGHT_BYTES), id="dtype-a-list"),
    pytest.param(frames_with({"op": "x", "arrays": [["a", {"d": 1}, [2]]]}, EIGHT_BYTES), id="dtype-a-map"),
    pytest.param(
        frames_with({"op": "x", "arrays": [["a", "<f4", [65536, 65536, 65536, 65536]]]}, b""),
        id="shape-product-overflows-int64",
    ),
]


@pytest.mark.parametrize("frames", REJECT_CASES)
def test_decode_rejects_malformed_frames_with_protocol_error(frames: list[bytes]) -> None:
    with pytest.raises(ProtocolError):
        wire.decode(frames, MAX_FRAME)


def test_decode_rejects_a_frame_over_max_frame_bytes_even_when_its_size_matches_the_spec() -> None:
    arrays = {"big": np.zeros(1024, dtype=np.float32)}  # 4096 bytes
    frames = wire.encode({"op": "insert"}, arrays)

    assert wire.decode(frames, max_frame_bytes=4096).arrays["big"].shape == (1024,)
    with pytest.raises(ProtocolError, match="exceeds"):
        wire.decode(frames, max_frame_bytes=4095)


def test_error_reply_is_a_decodable_error_message_carrying_extra_fields() -> None:
    msg = wire.decode(wire.error_reply("bad_request", "no such op", req=12), MAX_FRAME)
    assert msg.op == "error"
    assert msg.header == {"op": "error", "code": "bad_request", "message": "no such op", "req": 12}


PEEK_CASES = [
    pytest.param(msgpack.packb({"op": "?", "req": 42}), 42, id="int-req"),
    pytest.param(msgpack.packb({"op": "?", "req": "42"}), None, id="string-req"),
    pytest.param(msgpack.packb([1, 2]), None, id="not-a-map"),
    pytest.param(b"\xc1garbage", None, id="garbage"),
    pytest.param(b"\x80" + b"\x00" * wire.MAX_HEADER_BYTES, None, id="oversize"),
]


@pytest.mark.parametrize(("frame", "expected"), PEEK_CASES)
def test_peek_req_recovers_the_request_id_only_when_it_is_an_int(frame: bytes, expected: int | None) -> None:
    assert wire.peek_req(frame) == expected


def _decode_or_protocol_error(frames: list[bytes]) -> None:
    with contextlib.suppress(ProtocolError):
        wire.decode(frames, max_frame_bytes=4096)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=256), min_size=0, max_size=5))
def test_random_bytes_as_frames_never_raise_anything_but_protocol_error(frames: list[bytes]) -> None:
    _decode_or_protocol_error(frames)


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.binary(max_size=8)
    | st.sampled_from(["<f4", "<i8", "|u1", "|b1", "|O", "<U4", "insert", "sample"]),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)
spec = (
    st.tuples(
        st.text(max_size=4),
        st.sampled_from(["<f4", "<i8", "|u1"]) | msgpack_values,
        st.lists(st.integers(min_value=0, max_value=4), max_size=3) | msgpack_values,
    ).map(list)
    | msgpack_values
)


@st.composite
def hostile_messages(draw: st.DrawFn) -> list[bytes]:
    """Mostly well-formed envelopes (string op, one spec per frame) around hostile specs."""
    n = draw(st.integers(min_value=0, max_value=3))
    head = {
        "op": draw(st.sampled_from(["insert", "sample"]) | msgpack_values),
        "arrays": draw(st.lists(spec, min_size=n, max_size=n) | msgpack_values),
    }
    if draw(st.booleans()):
        head["req"] = draw(msgpack_values)
    payloads = draw(st.lists(st.binary(max_size=64), min_size=n, max_size=n))
    if draw(st.integers(min_value=0, max_value=9)) == 0:
        payloads.append(b"")
    return [msgpack.packb(head), *payloads]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_messages())
def test_structured_but_hostile_headers_never_raise_anything_but_protocol_error(frames: list[bytes]) -> None:
    _decode_or_protocol_error(frames)
