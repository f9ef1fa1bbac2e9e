"""replay/sumtree.py against a brute-force reference, under random operation sequences."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from canopy.replay.sumtree import SumTree


def reference_find(leaves: np.ndarray, mass: np.ndarray) -> np.ndarray:
    """The leaf whose cumulative interval holds each mass (brute force, O(n) per query)."""
    cum = np.cumsum(leaves)
    return np.searchsorted(cum, mass, side="right")


@settings(max_examples=200, deadline=None)
@given(
    capacity=st.integers(min_value=1, max_value=300),
    ops=st.lists(
        st.tuples(
            st.lists(st.integers(min_value=0, max_value=299), min_size=1, max_size=40),
            st.lists(
                st.one_of(st.just(0.0), st.floats(min_value=1e-6, max_value=1e6)), min_size=1, max_size=40
            ),
        ),
        min_size=1,
        max_size=30,
    ),
    rebuild_every=st.sampled_from([7, 100, 1 << 20]),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_sumtree_matches_a_brute_force_reference_after_random_updates(
    capacity: int, ops: list, rebuild_every: int, seed: int
) -> None:
    tree = SumTree(capacity, rebuild_every=rebuild_every)
    ref = np.zeros(capacity)
    for idx_list, values in ops:
        idx = np.array(idx_list) % capacity
        vals = np.resize(np.array(values), len(idx))
        tree.set(idx, vals)
        for i, v in zip(idx, vals, strict=True):  # duplicates: the last write wins
            ref[i] = v
        total = ref.sum()
        assert np.isclose(tree.total, total, rtol=1e-9, atol=1e-9)
        nonzero = ref[ref > 0]
        assert tree.min == (nonzero.min() if len(nonzero) else np.inf)
        np.testing.assert_array_equal(tree.get(np.arange(capacity)), ref)
        if total > 0:
            rng = np.random.default_rng(seed)
            mass = rng.random(64) * total
            got = tree.find(mass)
            assert (ref[got] > 0).all(), "an empty leaf was sampled"
            want = np.minimum(reference_find(ref, mass), capacity - 1)
            # Rounding may move a mass that sits on an interval edge to a neighbour;
            # everywhere else the tree and the reference agree exactly.
            cum = np.cumsum(ref)
            edge = np.isclose(mass[:, None], cum[None, :], rtol=1e-9, atol=1e-9).any(axis=1)
            np.testing.assert_array_equal(got[~edge], want[~edge])


def test_sampling_frequencies_follow_leaf_weights() -> None:
    tree = SumTree(5)
    tree.set(np.arange(5), np.array([1.0, 0.0, 2.0, 3.0, 4.0]))
    rng = np.random.default_rng(0)
    leaves = tree.find(rng.random(200_000) * tree.total)
    freq = np.bincount(leaves, minlength=5) / len(leaves)
    np.testing.assert_allclose(freq, [0.1, 0.0, 0.2, 0.3, 0.4], atol=0.005)


def test_rebuild_removes_drift_from_many_incremental_updates() -> None:
    tree = SumTree(1024, rebuild_every=1 << 40)  # never rebuilds on its own
    rng = np.random.default_rng(0)
    for _ in range(2000):
        idx = rng.integers(0, 1024, 64)
        tree.set(idx, rng.random(64) * 10.0 ** rng.integers(-8, 8))
    exact = tree.get(np.arange(1024)).sum()
    tree.rebuild()
    assert tree.total == exact or np.isclose(tree.total, exact, rtol=1e-15)


def test_a_sample_costs_one_descent_of_log_n_levels_not_a_scan() -> None:
    tree = SumTree(1 << 20)
    assert tree.depth == 20
    tree.set(np.array([5, 1_000_000]), np.array([1.0, 1.0]))
    got = tree.find(np.array([0.5, 1.5]))
    assert got.tolist() == [5, 1_000_000]


@settings(max_examples=200, deadline=None)
@given(
    leaves=st.lists(
        st.one_of(st.just(0.0), st.floats(min_value=1e-12, max_value=1e12)), min_size=1, max_size=70
    ),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_the_fast_descent_returns_exactly_what_the_guarded_descent_returns(leaves: list, seed: int) -> None:
    tree = SumTree(len(leaves))
    tree.set(np.arange(len(leaves)), np.array(leaves))
    if tree.total <= 0:
        return
    rng = np.random.default_rng(seed)
    # Masses at and just past every edge, where rounding decides, and at the very top.
    cum = np.cumsum(leaves)
    mass = np.concatenate([rng.random(32) * tree.total, cum, np.nextafter(cum, np.inf), [tree.total]])
    mass = np.minimum(mass, np.nextafter(tree.total, 0))
    got = tree.find(mass)
    np.testing.assert_array_equal(got, tree._find_guarded(mass))
    assert (tree.get(got) > 0).all(), "an empty leaf was sampled"


def test_the_smallest_leaf_follows_writes_that_raise_or_empty_it() -> None:
    tree = SumTree(8)
    tree.set(np.arange(4), np.array([3.0, 1.0, 2.0, 1.0]))
    assert tree.min == 1.0
    tree.set(np.array([1]), np.array([5.0]))  # one of two leaves holding the minimum rises
    assert tree.min == 1.0
    tree.set(np.array([3]), np.array([0.0]))  # the other one empties
    assert tree.min == 2.0
    tree.set(np.array([2, 2]), np.array([0.5, 4.0]))  # duplicates: the last write counts
    assert tree.min == 3.0
    tree.set(np.arange(4), np.zeros(4))
    assert tree.min == np.inf
