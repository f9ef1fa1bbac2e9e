"""replay/packed.py: one-frame sample replies, their reusable buffers and the client's checks."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import zmq

from canopy import wire
from canopy.cluster.bench.replay_procs import PixelStream
from canopy.errors import ProtocolError
from canopy.replay.packed import ALIGN, FRAMES, INDEX, PACKED, POOL, Layout, Layouts, Unpacker, rebuild
from canopy.replay.table import Table

COLUMNS = [
    ("obs", np.dtype(np.float32), (4,)),
    ("action", np.dtype(np.int64), ()),
    ("flag", np.dtype(np.uint8), ()),
    ("prob", np.dtype(np.float64), ()),
]


def roundtrip(layout: Layout, buf) -> dict[str, np.ndarray]:
    """What a client gets: the reply's header and payload through wire.decode and Unpacker."""
    head = layout.header({"op": "batch", "size": 3, "total": 1.5, "min_weight": 0.5, "req": 7})
    msg = wire.decode([head, bytes(buf.data)], 1 << 26)
    assert msg.header["req"] == 7 and msg.header["total"] == 1.5
    return Unpacker()(msg.header, msg.arrays)


def test_a_packed_reply_round_trips_every_column_at_aligned_offsets() -> None:
    layout = Layout(COLUMNS, n=5)
    assert all(off % ALIGN == 0 for off in layout.offsets)
    buf = layout.acquire()
    rng = np.random.default_rng(0)
    want = {
        "obs": rng.random((5, 4)).astype(np.float32),
        "action": np.arange(5),
        "flag": np.array([1, 0, 1, 1, 0], np.uint8),
        "prob": rng.random(5),
    }
    for k, a in want.items():
        buf.views[k][:] = a
    got = roundtrip(layout, buf)
    assert list(got) == list(want)
    for k, a in want.items():
        assert got[k].dtype == a.dtype
        np.testing.assert_array_equal(got[k], a)


def test_a_small_layout_reuses_one_buffer_and_a_large_one_pools_tracked_buffers() -> None:
    small = Layout(COLUMNS, n=8)
    assert small.small and small.acquire() is small.acquire()
    large = Layout([("obs", np.dtype(np.uint8), (4, 84, 84))], n=64)
    assert not large.small
    ctx = zmq.Context.instance()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    try:
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        push.connect(f"tcp://127.0.0.1:{port}")
        first = large.acquire()
        first.trackers.append(push.send(first.data, copy=False, track=True))
        first.trackers[0].wait(5)  # sent: the buffer may serve the next reply
        assert large.acquire() is first
        held = []
        for _ in range(POOL + 2):  # every pooled buffer "in flight": one-offs beyond the pool
            b = large.acquire()
            b.trackers.append(_Pending())
            held.append(b)
        assert len(large.buffers) == POOL
        assert len({id(b) for b in held}) == len(held)
    finally:
        pull.close(0)
        push.close(0)


class _Pending:
    done = False


def test_layouts_are_built_once_per_batch_length() -> None:
    layouts, calls = Layouts(), []

    def columns() -> tuple[list, None]:
        calls.append(1)
        return COLUMNS, None

    a = layouts.get(4, columns, unique=False)
    assert layouts.get(4, columns, unique=False) is a and len(calls) == 1
    assert layouts.get(3, columns, unique=False).n == 3 and len(calls) == 2
    assert layouts.get(4, columns, unique=True) is not a and len(calls) == 3


def bad(layout, size: int = 256, arrays=None) -> None:
    arrays = {PACKED: np.zeros(size, np.uint8)} if arrays is None else arrays
    with pytest.raises(ProtocolError):
        Unpacker()({"layout": layout}, arrays)


@pytest.mark.parametrize(
    "layout",
    [
        pytest.param("nope", id="not-a-list"),
        pytest.param([["a", "<f4", [4]]], id="three-fields"),
        pytest.param([["a", "|O", [4], 0]], id="object-dtype"),
        pytest.param([["a", "<f8", [64], 0]], id="overruns-the-frame"),
        pytest.param([["a", "<f4", [4], 250]], id="offset-past-the-end"),
        pytest.param([["a", "<f4", [4], -8]], id="negative-offset"),
        pytest.param([["a", "<f4", [4], 0], ["a", "<f4", [4], 64]], id="duplicate-name"),
        pytest.param([["a", "<f4", [-1], 0]], id="negative-size"),
        pytest.param([["a", "<f4", [True], 0]], id="bool-size"),
        pytest.param([[7, "<f4", [4], 0]], id="name-not-a-string"),
        pytest.param([["a", "<f4", [4], 1.5]], id="float-offset"),
    ],
)
def test_the_unpacker_refuses_a_layout_that_does_not_fit_its_frame(layout) -> None:
    bad(layout)


def test_the_unpacker_refuses_a_reply_without_exactly_one_packed_array() -> None:
    layout = [["a", "<f4", [4], 0]]
    bad(layout, arrays={})
    bad(layout, arrays={PACKED: np.zeros(64, np.uint8), "b": np.zeros(1, np.uint8)})
    bad(layout, arrays={PACKED: np.zeros(16, np.float32)})


def test_a_cached_layout_is_checked_again_for_a_shorter_frame() -> None:
    unpack = Unpacker()
    layout = [["a", "<f4", [16], 0]]
    assert unpack({"layout": layout}, {PACKED: np.zeros(64, np.uint8)})["a"].shape == (16,)
    with pytest.raises(ProtocolError):
        unpack({"layout": list(layout)}, {PACKED: np.zeros(32, np.uint8)})


def test_a_header_with_too_many_fields_is_refused() -> None:
    with pytest.raises(ValueError):
        Layout(COLUMNS, 2).header({f"k{i}": i for i in range(14)})
    assert isinstance(msgpack.unpackb(Layout(COLUMNS, 2).header({"op": "batch"})), dict)


def test_gather_into_views_matches_gather_for_plain_and_pixel_tables() -> None:
    rng = np.random.default_rng(0)
    plain = Table(100)
    plain.insert({"obs": rng.random((60, 4)).astype(np.float32), "action": np.arange(60)})
    pixel = Table(300, frame_window=256)
    stream = PixelStream(3)
    for _ in range(5):
        pixel.insert(stream.chunk(32))
    for table in (plain, pixel):
        slots = table.draw(16, rng)[0]
        layout = Layout(table.item_layout(), len(slots))
        buf = layout.acquire()
        table.gather(slots, buf.views)
        want = table.gather(slots)
        assert set(want) == set(buf.views)
        for k, a in want.items():
            np.testing.assert_array_equal(buf.views[k], a)


def unique_reply(index: np.ndarray, frames: np.ndarray) -> tuple[dict, dict[str, np.ndarray]]:
    """A unique-frame reply's header and arrays with one index column `obs_frame_index`."""
    layout = Layout(
        [("obs" + INDEX, index.dtype, index.shape[1:])], len(index), (len(frames), frames.shape[1:])
    )
    buf = layout.acquire()
    buf.views["obs" + INDEX][:] = index
    buf.frames[:] = frames
    msg = wire.decode([layout.header({"op": "batch"}, len(frames)), bytes(buf.data), bytes(frames)], 1 << 26)
    return msg.header, msg.arrays


def test_a_unique_frame_reply_rebuilds_each_stack_from_the_frames_it_names() -> None:
    frames = np.arange(3 * 2 * 2, dtype=np.uint8).reshape(3, 2, 2)
    index = np.array([[0, 0, 1], [2, 1, 0]], np.int32)
    header, arrays = unique_reply(index, frames)
    got = rebuild(Unpacker()(header, arrays))
    assert list(got) == ["obs"]
    np.testing.assert_array_equal(got["obs"], frames[index])


@pytest.mark.parametrize(
    "index",
    [
        pytest.param(np.array([[0, 3]], np.int32), id="past-the-last-frame"),
        pytest.param(np.array([[0, -1]], np.int32), id="negative"),
        pytest.param(np.array([[0.0, 1.0]], np.float32), id="not-an-integer"),
    ],
)
def test_the_unpacker_refuses_frame_indexes_that_name_no_frame(index: np.ndarray) -> None:
    header, arrays = unique_reply(index, np.zeros((3, 2, 2), np.uint8))
    with pytest.raises(ProtocolError):
        Unpacker()(header, arrays)


def test_the_unpacker_refuses_frames_without_indexes_and_indexes_without_frames() -> None:
    header, arrays = unique_reply(np.zeros((1, 2), np.int32), np.zeros((3, 2, 2), np.uint8))
    with pytest.raises(ProtocolError):
        Unpacker()(dict(header), {PACKED: arrays[PACKED]})
    with pytest.raises(ProtocolError):  # frames of the wrong dtype
        Unpacker()(dict(header), {PACKED: arrays[PACKED], FRAMES: np.zeros((3, 4), np.float32)})
    plain = Layout(COLUMNS, n=2)
    msg = wire.decode([plain.header({"op": "batch"}), bytes(plain.acquire().data)], 1 << 26)
    with pytest.raises(ProtocolError):
        Unpacker()(msg.header, {**msg.arrays, FRAMES: np.zeros((3, 2, 2), np.uint8)})


def pixel_reply(table: Table, slots: np.ndarray) -> tuple[dict[str, np.ndarray], int]:
    """(what a client rebuilds, frames sent) for a frame-index reply of `slots`; the frames
    arrive in writable memory, as zmq frames received with copy=False do."""
    room = (len(slots) * table.frames_per_item, table.frames.frame_shape)
    layout = Layout(table.item_layout(unique_frames=True), len(slots), room)
    buf = layout.acquire()
    table.gather(slots, buf.views)
    u = table.gather_frames(slots, buf.views, buf.frames)
    head = layout.header({"op": "batch"}, u)
    msg = wire.decode([head, bytes(buf.data), bytearray(buf.frames[:u])], 1 << 26)
    arrays = Unpacker()(msg.header, msg.arrays)
    frames = arrays[FRAMES]
    got = rebuild(arrays)
    for name in ("obs", "next_obs"):
        np.testing.assert_array_equal(got[name], table.gather(slots)[name])
        assert got[name].flags.writeable
    got[FRAMES] = frames
    return got, u


def test_one_step_transitions_travel_as_a_window_of_five_frames_the_client_views_without_a_copy() -> None:
    table = Table(300, frame_window=256)
    stream = PixelStream(3)
    for _ in range(5):
        table.insert(stream.chunk(32))
    slots = np.array([0, 7, 7, 150, 3, 1])  # an episode start, a repeat, neighbours
    got, u = pixel_reply(table, slots)
    assert u == 5 * len(slots)
    assert np.shares_memory(got["obs"], got[FRAMES]) and np.shares_memory(got["obs"], got["next_obs"])


def test_transitions_not_one_frame_apart_travel_as_each_distinct_frame_once() -> None:
    table = Table(300, frame_window=256)
    stream = PixelStream(3)
    for _ in range(5):
        chunk = stream.chunk(32)
        chunk["next_obs"][:-1] = chunk["next_obs"][1:]  # two frames on, as an n-step adder's
        table.insert(chunk)
    slots = np.arange(160)  # one episode: its frames once, plus the start's
    got, u = pixel_reply(table, slots)
    assert u == 160 + 1
    assert not np.shares_memory(got["obs"], got[FRAMES])


@pytest.mark.parametrize("off_by_one", [False, True])
def test_rebuild_views_runs_of_consecutive_frames_and_copies_anything_else(off_by_one: bool) -> None:
    frames = np.arange(12 * 2 * 2, dtype=np.uint8).reshape(12, 2, 2)
    index = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]], np.int32)
    if off_by_one:
        index[2, 1] = 9
    header, arrays = unique_reply(index, frames)
    arrays[FRAMES] = arrays[FRAMES].copy()  # writable, as a zmq frame received with copy=False
    got = rebuild(Unpacker()(header, arrays))
    np.testing.assert_array_equal(got["obs"], frames[index])
    assert np.shares_memory(got["obs"], arrays[FRAMES]) is not off_by_one
