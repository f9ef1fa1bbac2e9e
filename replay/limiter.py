"""Samples-per-insert rate limiter (Reverb's SampleToInsertRatio), in units of items.

Place in the data flow: every table of a shard (replay/server.py) has one; inserts and
samples the limiter holds back wait, parked, until the other side has moved.

`diff = inserted * spi - sampled` must stay within `offset +- error_buffer`, where
`offset = spi * min_size`. Inserts wait while diff is above the band (the learner is
behind), samples wait while it is below (the actors are behind) or the table is smaller
than `min_size`.

Why it cannot deadlock: with `error_buffer >= batch` and `error_buffer >= chunk * spi`,
an insert is refused only when diff > max_diff, and then diff - batch >= min_diff, so a
sample is allowed (the table is past min_size, since diff only exceeds offset after
min_size items went in); a sample is refused only when diff - batch < min_diff, and
then diff < max_diff, so an insert is allowed. One side can always move.
With spi = 0 the limiter only enforces min_size.

Runtime changes (`configure` op, replay/protocol.py) build a new limiter that keeps the
inserted/sampled counts, then serve parked requests at once. The argument above holds for
the new band as long as the new error_buffer still satisfies the same two conditions; a
diff left outside the new band moves back in because the side that pulls it back is the
one allowed to proceed.
"""

from __future__ import annotations

from typing import Any


class RateLimiter:
    """Holds inserts or samples back to keep samples per insert within its band."""

    def __init__(self, samples_per_insert: float, min_size: int, error_buffer: float) -> None:
        self.spi = samples_per_insert
        self.min_size = min_size
        offset = samples_per_insert * min_size
        self.min_diff = offset - error_buffer
        self.max_diff = offset + error_buffer
        self.inserted = 0
        self.sampled = 0

    @property
    def diff(self) -> float:
        """inserted * spi - sampled: what the band bounds."""
        return self.inserted * self.spi - self.sampled

    def can_insert(self) -> bool:
        """Whether an insert may go ahead now (diff not above the band)."""
        return self.spi == 0 or self.diff <= self.max_diff

    def can_sample(self, size: int, batch: int) -> bool:
        """Whether one batch may be sampled now from a table of `size` items."""
        if size < self.min_size:
            return False
        return self.spi == 0 or self.diff - batch >= self.min_diff

    def batches(self, size: int, batch: int, most: int) -> int:
        """How many batches of `batch` items may be sampled now, at most `most`; 0 exactly
        when `can_sample` refuses one."""
        if not self.can_sample(size, batch):
            return 0
        if self.spi == 0:
            return most
        return max(1, min(most, int((self.diff - self.min_diff) // batch)))

    def state(self) -> str:
        """ "blocking_inserts" while diff is above the band, else "open"."""
        if self.spi and self.diff > self.max_diff:
            return "blocking_inserts"
        return "open"

    def settings(self) -> dict[str, float]:
        """The constructor's arguments: what `configure` changes and a snapshot restores."""
        return {
            "samples_per_insert": self.spi,
            "min_size": self.min_size,
            "error_buffer": self.max_diff - self.spi * self.min_size,
        }

    def view(self) -> dict[str, Any]:
        """State and settings, as the stats hash and the `configured` reply show them."""
        return {"limiter_state": self.state(), "limiter_diff": round(self.diff, 1), **self.settings()}
