"""replay/storage.py: the ring table's overwrite order, capacity, signature and samples."""

from __future__ import annotations

import numpy as np
import pytest

from cluster.errors import ProtocolError
from replay.storage import Table


def chunk(start: int, n: int, obs_dim: int = 3) -> dict[str, np.ndarray]:
    """Items numbered start..start+n-1: obs rows hold their number, so slots are traceable."""
    ids = np.arange(start, start + n)
    return {
        "obs": np.repeat(ids[:, None], obs_dim, axis=1).astype(np.float32),
        "action": ids.astype(np.int64),
    }


def stored_ids(table: Table) -> list[int]:
    return sorted(table.columns["action"][: table.size].tolist())


def test_table_fills_up_to_capacity_then_keeps_the_newest_items() -> None:
    table = Table(capacity=10)
    assert table.insert(chunk(0, 4)) == 4
    assert table.insert(chunk(4, 4)) == 4
    assert (table.size, table.inserted) == (8, 8)
    table.insert(chunk(8, 5))  # 13 in total: items 0..2 are overwritten

    assert table.size == 10
    assert table.inserted == 13
    assert stored_ids(table) == list(range(3, 13))
    # FIFO overwrite: the oldest slots are reused in order.
    assert table.columns["action"][:3].tolist() == [10, 11, 12]
    assert table.cursor == 3


def test_a_chunk_larger_than_capacity_keeps_only_its_newest_items() -> None:
    table = Table(capacity=5)
    table.insert(chunk(0, 2))
    table.insert(chunk(100, 12))
    assert table.size == 5
    assert stored_ids(table) == list(range(107, 112))
    # Later inserts still continue the ring in order.
    table.insert(chunk(200, 1))
    assert stored_ids(table) == [*range(108, 112), 200]


def test_columns_take_the_shape_and_dtype_of_the_first_insert() -> None:
    table = Table(capacity=7)
    table.insert(chunk(0, 2, obs_dim=4))
    assert table.signature() == {"obs": ("<f4", (4,)), "action": ("<i8", ())}
    assert table.columns["obs"].shape == (7, 4)
    assert table.nbytes == 7 * 4 * 4 + 7 * 8


SIGNATURE_MISMATCHES = [
    pytest.param({"obs": np.zeros((2, 3), np.float64), "action": np.zeros(2, np.int64)}, id="other-dtype"),
    pytest.param({"obs": np.zeros((2, 4), np.float32), "action": np.zeros(2, np.int64)}, id="other-shape"),
    pytest.param({"obs": np.zeros((2, 3), np.float32)}, id="missing-column"),
    pytest.param(
        {"obs": np.zeros((2, 3), np.float32), "action": np.zeros(2, np.int64), "x": np.zeros(2)},
        id="extra-column",
    ),
    pytest.param({"obs": np.zeros((2, 3), np.float32), "action": np.zeros(3, np.int64)}, id="ragged-lengths"),
    pytest.param({"obs": np.zeros((0, 3), np.float32), "action": np.zeros(0, np.int64)}, id="empty-chunk"),
    pytest.param({"obs": np.float32(1.0) * np.ones(()), "action": np.zeros(1, np.int64)}, id="scalar-column"),
    pytest.param({}, id="no-arrays"),
]


@pytest.mark.parametrize("bad", SIGNATURE_MISMATCHES)
def test_an_insert_that_differs_from_the_signature_is_refused_and_changes_nothing(bad: dict) -> None:
    table = Table(capacity=10)
    table.insert(chunk(0, 4))
    before = {k: c.copy() for k, c in table.columns.items()}

    with pytest.raises(ProtocolError):
        table.insert(bad)

    assert (table.size, table.inserted, table.cursor) == (4, 4, 4)
    for k, c in table.columns.items():
        np.testing.assert_array_equal(c, before[k])


def test_sample_returns_batch_rows_from_filled_slots_with_matching_columns() -> None:
    table = Table(capacity=100)
    table.insert(chunk(0, 30))
    rng = np.random.default_rng(0)

    arrays, slots = table.sample(64, rng)

    assert arrays["obs"].shape == (64, 3)
    assert arrays["action"].shape == (64,)
    assert slots.shape == (64,)
    assert ((slots >= 0) & (slots < 30)).all()
    # Rows of one sample belong together: obs row i is item action[i].
    np.testing.assert_array_equal(arrays["obs"][:, 0], arrays["action"].astype(np.float32))
    np.testing.assert_array_equal(arrays["action"], slots)


def test_sample_covers_the_whole_ring_after_wrapping() -> None:
    table = Table(capacity=8)
    table.insert(chunk(0, 13))
    arrays, _ = table.sample(2000, np.random.default_rng(1))
    assert set(arrays["action"].tolist()) == set(range(5, 13))


def test_sample_from_an_empty_table_is_an_error() -> None:
    with pytest.raises(ValueError):
        Table(capacity=4).sample(1, np.random.default_rng(0))
