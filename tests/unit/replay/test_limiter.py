"""replay/limiter.py: the samples-per-insert band, min_size, and freedom from deadlock."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from canopy.replay.limiter import RateLimiter


def test_no_sample_before_min_size_items_even_with_the_limiter_off() -> None:
    for spi in (0.0, 4.0):
        lim = RateLimiter(samples_per_insert=spi, min_size=100, error_buffer=1000)
        assert not lim.can_sample(size=99, batch=1)
        assert lim.can_sample(size=100, batch=1)


def test_spi_zero_never_blocks_inserts_or_samples_past_min_size() -> None:
    lim = RateLimiter(samples_per_insert=0, min_size=1, error_buffer=0)
    lim.inserted, lim.sampled = 1, 10**9
    assert lim.can_sample(size=1, batch=10**6)
    lim.inserted, lim.sampled = 10**9, 0
    assert lim.can_insert()
    assert lim.state() == "open"


BAND_CASES = [
    # (inserted, sampled, can_insert, can_sample(batch=10)); spi=2, min_size=10, buffer=20:
    # offset = 20, band = [0, 40] on diff = 2 * inserted - sampled.
    pytest.param(10, 0, True, True, id="at-min-size-diff-20"),
    pytest.param(20, 0, True, True, id="diff-40-at-the-top-edge"),
    pytest.param(21, 0, False, True, id="diff-42-above-band-blocks-inserts"),
    pytest.param(20, 30, True, True, id="diff-10-sample-lands-on-lower-edge"),
    pytest.param(20, 31, True, False, id="diff-9-sample-would-leave-band"),
    pytest.param(20, 40, True, False, id="diff-0"),
]


@pytest.mark.parametrize(("inserted", "sampled", "insert_ok", "sample_ok"), BAND_CASES)
def test_inserts_wait_above_the_band_and_samples_wait_below_it(
    inserted: int, sampled: int, insert_ok: bool, sample_ok: bool
) -> None:
    lim = RateLimiter(samples_per_insert=2.0, min_size=10, error_buffer=20)
    lim.inserted, lim.sampled = inserted, sampled
    assert lim.can_insert() is insert_ok
    assert lim.can_sample(size=inserted, batch=10) is sample_ok
    assert lim.state() == ("open" if insert_ok else "blocking_inserts")


@settings(max_examples=300, deadline=None)
@given(
    spi=st.sampled_from([0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 32.0]),
    min_size=st.integers(min_value=1, max_value=500),
    capacity_extra=st.integers(min_value=0, max_value=2000),
    batch=st.integers(min_value=1, max_value=256),
    chunk=st.integers(min_value=1, max_value=128),
    slack=st.floats(min_value=0.0, max_value=500.0),
    choices=st.lists(st.booleans(), min_size=50, max_size=400),
)
def test_under_the_documented_buffer_condition_one_side_can_always_move(
    spi: float,
    min_size: int,
    capacity_extra: int,
    batch: int,
    chunk: int,
    slack: float,
    choices: list[bool],
) -> None:
    """error_buffer >= batch and >= chunk * spi: never both insert and sample blocked."""
    error_buffer = max(batch, chunk * spi) + slack
    capacity = min_size + capacity_extra
    lim = RateLimiter(spi, min_size, error_buffer)
    for prefer_insert in choices:
        size = min(capacity, lim.inserted)
        may_insert, may_sample = lim.can_insert(), lim.can_sample(size, batch)
        assert may_insert or may_sample, (
            f"deadlock: inserted={lim.inserted} sampled={lim.sampled} diff={lim.diff} "
            f"band=[{lim.min_diff}, {lim.max_diff}]"
        )
        if may_insert and (prefer_insert or not may_sample):
            lim.inserted += chunk
        else:
            lim.sampled += batch
        # The band is kept: diff never leaves it by more than one step's worth.
        assert lim.diff <= lim.max_diff + chunk * spi
        if lim.inserted >= min_size:
            assert lim.diff >= lim.min_diff


@settings(max_examples=300, deadline=None)
@given(
    spi=st.sampled_from([0.0, 0.5, 1.0, 4.0]),
    inserted=st.integers(min_value=0, max_value=10_000),
    sampled=st.integers(min_value=0, max_value=40_000),
    batch=st.integers(min_value=1, max_value=512),
    most=st.integers(min_value=1, max_value=16),
)
def test_several_batches_are_allowed_only_as_far_as_each_of_them_would_be(
    spi: float, inserted: int, sampled: int, batch: int, most: int
) -> None:
    lim = RateLimiter(samples_per_insert=spi, min_size=10, error_buffer=1000)
    lim.inserted, lim.sampled = inserted, sampled
    k = lim.batches(size=inserted, batch=batch, most=most)
    assert 0 <= k <= most
    assert (k > 0) == lim.can_sample(size=inserted, batch=batch)
    if k:  # taking them one after another, the limiter would have let each one through
        for _ in range(k):
            assert lim.can_sample(size=inserted, batch=batch)
            lim.sampled += batch
