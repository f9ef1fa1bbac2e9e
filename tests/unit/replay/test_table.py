"""replay/table.py: overwrite order, capacity in items and bytes, signature, samples, addresses."""

from __future__ import annotations

import numpy as np
import pytest

from canopy.errors import ProtocolError
from canopy.replay.table import Table


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
    # ... and the next insert continues with slot 3 (the oldest remaining item, 3).
    table.insert(chunk(13, 1))
    assert table.columns["action"][3] == 13


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
    assert table.nbytes == 7 * 4 * 4 + 7 * 8 + 7 * Table.META_BYTES


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

    assert (table.size, table.inserted, table.nfree) == (4, 4, 6)
    for k, c in table.columns.items():
        np.testing.assert_array_equal(c, before[k])


def test_sample_returns_batch_rows_from_filled_slots_with_matching_columns() -> None:
    table = Table(capacity=100)
    table.insert(chunk(0, 30))
    rng = np.random.default_rng(0)

    s = table.sample(64, rng)
    arrays, slots = s.arrays, s.slots

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
    arrays = table.sample(2000, np.random.default_rng(1)).arrays
    assert set(arrays["action"].tolist()) == set(range(5, 13))


def test_sample_from_an_empty_table_is_an_error() -> None:
    with pytest.raises(ValueError):
        Table(capacity=4).sample(1, np.random.default_rng(0))


def test_a_byte_bound_caps_the_item_count_once_the_item_size_is_known() -> None:
    item = 3 * 4 + 8 + Table.META_BYTES
    table = Table(capacity=1000, max_bytes=10 * item)
    table.insert(chunk(0, 25))
    assert table.capacity == 10 and table.size == 10
    assert table.nbytes <= 10 * item
    assert stored_ids(table) == list(range(15, 25))


def test_a_priority_update_for_an_overwritten_slot_is_dropped() -> None:
    table = Table(capacity=4, sampler="prioritized")
    table.insert(chunk(0, 4))
    s = table.sample(4, np.random.default_rng(0))
    old_slot, old_gen = s.slots[:1], s.gens[:1]
    table.insert(chunk(10, 4))  # every slot rewritten: the sampled items are gone
    assert table.update_priorities(old_slot, old_gen, np.array([100.0])) == 0
    assert table.updates_dropped == 1
    fresh = table.sample(1, np.random.default_rng(0))
    assert table.update_priorities(fresh.slots, fresh.gens, np.array([5.0])) == 1
    assert table.prio[fresh.slots[0]] == 5.0


def test_prioritized_sampling_follows_priority_to_the_alpha() -> None:
    table = Table(capacity=8, sampler="prioritized", priority_exponent=0.5)
    table.insert({**chunk(0, 4), "priority": np.array([1.0, 4.0, 9.0, 16.0])})
    s = table.sample(40_000, np.random.default_rng(2))
    freq = np.bincount(s.arrays["action"], minlength=4) / 40_000
    expected = np.array([1, 2, 3, 4]) / 10  # sqrt of the priorities, normalised
    np.testing.assert_allclose(freq, expected, atol=0.01)
    np.testing.assert_allclose(s.probs, expected[s.arrays["action"]])
    assert s.total == 10.0 and s.min_weight == 1.0


def test_new_items_without_a_priority_get_the_largest_priority_seen() -> None:
    table = Table(capacity=8, sampler="prioritized", priority_exponent=1.0)
    table.insert({**chunk(0, 2), "priority": np.array([1.0, 7.0])})
    table.insert(chunk(2, 1))
    assert table.prio[2] == 7.0


QUEUE_CASES = [
    # (sampler, remover, expected order of ids drawn one per sample with max_times_sampled=1)
    pytest.param("fifo", "fifo", [0, 1, 2, 3, 4], id="queue"),
    pytest.param("lifo", "fifo", [4, 3, 2, 1, 0], id="stack"),
    pytest.param("min_heap", "fifo", [3, 1, 4, 0, 2], id="min-heap"),
    pytest.param("max_heap", "fifo", [2, 0, 4, 1, 3], id="max-heap"),
]


@pytest.mark.parametrize(("sampler", "remover", "order"), QUEUE_CASES)
def test_deterministic_selectors_with_max_times_sampled_one_drain_in_their_order(
    sampler: str, remover: str, order: list[int]
) -> None:
    table = Table(capacity=8, sampler=sampler, remover=remover, max_times_sampled=1)
    table.insert({**chunk(0, 5), "priority": np.array([4.0, 2.0, 5.0, 1.0, 3.0])})
    drawn = [int(table.sample(1, np.random.default_rng(0)).arrays["action"][0]) for _ in range(5)]
    assert drawn == order
    assert table.size == 0
    table.insert(chunk(10, 2))  # freed slots are reused
    assert table.size == 2 and table.nfree == 6


def test_a_deterministic_sampler_returns_its_head_item_for_the_whole_batch() -> None:
    table = Table(capacity=8, sampler="fifo")
    table.insert(chunk(0, 3))
    assert table.sample(4, np.random.default_rng(0)).arrays["action"].tolist() == [0, 0, 0, 0]
    assert table.size == 3


def test_max_times_sampled_removes_an_item_after_its_last_allowed_draw() -> None:
    table = Table(capacity=8, sampler="uniform", max_times_sampled=2)
    table.insert(chunk(0, 3))
    s = table.sample(6, np.random.default_rng(0))
    assert np.bincount(s.arrays["action"], minlength=3).tolist() == [2, 2, 2]
    assert table.size == 0
    # The generation reported for each draw is the one the item had while stored.
    assert table.update_priorities(s.slots, s.gens, np.ones(6)) == 0


REMOVER_CASES = [
    pytest.param("fifo", [2, 3, 4, 5], id="fifo-evicts-oldest"),
    pytest.param("lifo", [0, 1, 2, 5], id="lifo-evicts-newest"),  # 3, then 4
    pytest.param("min_heap", [0, 2, 4, 5], id="min-heap-evicts-lowest-priority"),  # p1, then p2
    pytest.param("max_heap", [0, 1, 3, 5], id="max-heap-evicts-highest-priority"),  # p4, then p9
]


@pytest.mark.parametrize(("remover", "kept"), REMOVER_CASES)
def test_a_full_table_evicts_what_its_remover_selects(remover: str, kept: list[int]) -> None:
    table = Table(capacity=4, remover=remover)
    table.insert({**chunk(0, 4), "priority": np.array([3.0, 1.0, 4.0, 2.0])})
    table.insert({**chunk(4, 1), "priority": np.array([9.0])})  # evicts one
    table.insert({**chunk(5, 1), "priority": np.array([9.5])})  # evicts another
    assert stored_ids(table) == kept


def test_a_uniform_remover_evicts_some_stored_item_and_keeps_the_table_full() -> None:
    table = Table(capacity=16, remover="uniform")
    table.insert(chunk(0, 100))
    assert table.size == 16 and len(set(stored_ids(table))) == 16


def test_unknown_selector_names_are_refused_with_the_known_names() -> None:
    with pytest.raises(ValueError, match="uniform, prioritized, fifo"):
        Table(capacity=4, sampler="random")


@pytest.mark.parametrize(
    ("sampler", "max_times_sampled", "queue"),
    [
        pytest.param("fifo", 1, True, id="fifo-once"),
        pytest.param("fifo", 0, False, id="fifo-unlimited"),
        pytest.param("fifo", 2, False, id="fifo-twice"),
        pytest.param("lifo", 1, False, id="stack"),
        pytest.param("uniform", 1, False, id="uniform-once"),
    ],
)
def test_only_a_fifo_sampler_with_max_times_sampled_one_is_a_queue(
    sampler: str, max_times_sampled: int, queue: bool
) -> None:
    assert Table(capacity=4, sampler=sampler, max_times_sampled=max_times_sampled).is_queue is queue


def test_a_queue_takes_a_chunk_only_while_it_fits_beside_the_unread_items() -> None:
    table = Table(capacity=8, sampler="fifo", max_times_sampled=1)
    assert table.room(8) and not table.room(9)
    table.insert(chunk(0, 6))
    assert table.room(2) and not table.room(3)
    with pytest.raises(ProtocolError, match="full"):
        table.insert(chunk(6, 3))
    assert (table.size, table.removed_total) == (6, 0) and stored_ids(table) == list(range(6))
    table.sample(4, np.random.default_rng(0))
    assert table.room(6) and not table.room(7)


def test_a_ring_has_room_for_any_chunk_and_evicts_to_make_it() -> None:
    table = Table(capacity=4, sampler="fifo")  # fifo, but samples do not remove: a ring
    table.insert(chunk(0, 4))
    assert table.room(100)
    table.insert(chunk(4, 2))
    assert stored_ids(table) == [2, 3, 4, 5] and table.removed_total == 2


def test_a_chunk_larger_than_a_queue_is_refused_with_the_capacity_and_the_fix() -> None:
    table = Table(capacity=8, sampler="fifo", max_times_sampled=1, name="unrolls")
    with pytest.raises(ProtocolError, match="holds 8 items, this chunk has 9") as refused:
        table.insert(chunk(0, 9))
    assert "extra_tables" in str(refused.value) and "\n" not in str(refused.value)
    assert not table.allocated
    # Capacity cut by the byte bound: the first chunk is held to what the bytes allow.
    item_bytes = 3 * 4 + 8 + Table.META_BYTES
    small = Table(capacity=100, sampler="fifo", max_times_sampled=1, max_bytes=5 * item_bytes)
    with pytest.raises(ProtocolError, match="holds 5 items, this chunk has 6"):
        small.insert(chunk(0, 6))
    assert small.insert(chunk(0, 5)) == 5 and small.capacity == 5


def test_a_queue_draw_takes_the_oldest_items_once_each_in_order() -> None:
    table = Table(capacity=8, sampler="fifo", remover="fifo", max_times_sampled=1)
    table.insert(chunk(0, 3))
    table.insert(chunk(3, 3))
    s = table.sample(4, np.random.default_rng(0))
    assert s.arrays["action"].tolist() == [0, 1, 2, 3]
    assert (table.size, table.removed_total) == (2, 4)
    assert table.update_priorities(s.slots, s.gens, np.ones(4)) == 0  # those items are gone
    assert table.sample(4, np.random.default_rng(0)).arrays["action"].tolist() == [4, 5]
    assert table.size == 0
