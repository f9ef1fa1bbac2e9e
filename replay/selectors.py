"""Selectors: which stored item a table samples next, and which one it evicts next.

Place in the data flow: replay/table.py owns two selectors per table (Reverb's sampler and
remover) over the same slot numbers. The table tells both about every insert, removal and
priority change; the sampler answers `sample`, the remover answers `pop`.

Kinds (Reverb's set): uniform, prioritized, fifo, lifo, min_heap, max_heap. fifo/lifo
order by insertion sequence, the heaps by priority. Deterministic selectors return the
same item for every draw of a batch until it is removed (as Reverb does); combine them
with `max_times_sampled=1` for a queue or a stack.
"""

from __future__ import annotations

import heapq
from typing import Protocol

import numpy as np

from canopy.replay.sumtree import SumTree

KINDS = ("uniform", "prioritized", "fifo", "lifo", "min_heap", "max_heap")


class Selector(Protocol):
    """What a table asks of a selector: told of every insert, removal and priority change."""

    deterministic: bool

    def insert(self, slots: np.ndarray, seqs: np.ndarray, priorities: np.ndarray) -> None:
        """New items in `slots`, with their insertion numbers and priorities."""

    def remove(self, slots: np.ndarray) -> None:
        """Forget the items in `slots` (slots already forgotten are ignored)."""

    def update(self, slots: np.ndarray, priorities: np.ndarray) -> None:
        """New priorities for live items (ignored by selectors that do not order by priority)."""

    def sample(self, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(slots, probabilities) of k draws with replacement; the items stay."""

    def pop(self, k: int, rng: np.random.Generator) -> np.ndarray:
        """Take k distinct items out (the remover's eviction); returns their slots."""


def make(kind: str, capacity: int, priority_exponent: float = 1.0) -> Selector:
    """A selector by its Reverb name; ValueError lists the known names."""
    if kind == "uniform":
        return Uniform(capacity)
    if kind == "prioritized":
        return Prioritized(capacity, priority_exponent)
    if kind in ("fifo", "lifo"):
        return Order(capacity, lifo=kind == "lifo")
    if kind in ("min_heap", "max_heap"):
        return Heap(capacity, largest=kind == "max_heap")
    raise ValueError(f"unknown selector {kind!r}: expected one of {', '.join(KINDS)}")


class Uniform:
    """Dense array of live slots + each slot's position in it: O(1) insert/remove, O(k) sample."""

    deterministic = False

    def __init__(self, capacity: int):
        self.items = np.zeros(capacity, np.int64)
        self.pos = np.full(capacity, -1, np.int64)
        self.n = 0

    def insert(self, slots: np.ndarray, seqs: np.ndarray, priorities: np.ndarray) -> None:
        """Append the slots to the dense array."""
        k = len(slots)
        self.items[self.n : self.n + k] = slots
        self.pos[slots] = np.arange(self.n, self.n + k)
        self.n += k

    def remove(self, slots: np.ndarray) -> None:
        """Fill each removed slot's place with the last live one."""
        for s in np.asarray(slots).tolist():  # swap-with-last keeps the array dense
            p = self.pos[s]
            if p < 0:
                continue
            last = self.items[self.n - 1]
            self.items[p] = last
            self.pos[last] = p
            self.pos[s] = -1
            self.n -= 1

    def update(self, slots: np.ndarray, priorities: np.ndarray) -> None:
        """Nothing to do: every item weighs the same."""
        pass  # priorities do not change a uniform draw

    def sample(self, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """k uniform draws with replacement, each of probability 1/n."""
        idx = rng.integers(0, self.n, size=k)
        return self.items[idx], np.full(k, 1.0 / self.n)

    def pop(self, k: int, rng: np.random.Generator) -> np.ndarray:
        """k distinct items drawn uniformly, removed."""
        chosen = self.items[rng.choice(self.n, size=k, replace=False)].copy()
        self.remove(chosen)
        return chosen

    def weights(self) -> tuple[float, float]:
        """(total, smallest) sampling weight: every item weighs 1."""
        return float(self.n), 1.0 if self.n else 0.0


class Prioritized:
    """P(i) = p_i**alpha / sum_j p_j**alpha over a double-precision sum-tree."""

    deterministic = False

    def __init__(self, capacity: int, exponent: float):
        self.tree = SumTree(capacity)
        self.alpha = exponent
        self.n = 0
        self.live = np.zeros(capacity, bool)

    def insert(self, slots: np.ndarray, seqs: np.ndarray, priorities: np.ndarray) -> None:
        """Set the new items' leaves to priority**alpha."""
        self.n += int((~self.live[slots]).sum())
        self.live[slots] = True
        self.tree.set(slots, self._leaf(priorities))

    def remove(self, slots: np.ndarray) -> None:
        """Zero the removed items' leaves."""
        slots = slots[self.live[slots]]
        self.n -= len(np.unique(slots))
        self.live[slots] = False
        self.tree.set(slots, 0.0)

    def update(self, slots: np.ndarray, priorities: np.ndarray) -> None:
        """New leaves for the items still live (updates of removed ones are dropped)."""
        keep = self.live.take(slots)
        if not keep.all():  # the table already dropped updates for removed items
            slots, priorities = slots[keep], priorities[keep]
        self.tree.set(slots, self._leaf(priorities))

    def sample(self, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """k draws in proportion to p**alpha, with each one's probability."""
        total = self.tree.total
        slots = self.tree.find(rng.random(k) * total)
        return slots, self.tree.get(slots) / total

    def pop(self, k: int, rng: np.random.Generator) -> np.ndarray:
        """k distinct items by priority, drawn and removed one at a time."""
        out = []
        for _ in range(k):  # without replacement: draw, remove, draw again
            slot, _ = self.sample(1, rng)
            self.remove(slot)
            out.append(int(slot[0]))
        return np.asarray(out, np.int64)

    def weights(self) -> tuple[float, float]:
        """(total, smallest non-zero) leaf weight p**alpha: what global IS weights need."""
        return self.tree.total, self.tree.min if self.n else 0.0

    def _leaf(self, priorities: np.ndarray) -> np.ndarray:
        p = np.asarray(priorities, np.float64)
        if not np.isfinite(p).all() or (p < 0).any():
            raise ValueError("priorities must be finite and >= 0")
        return p**self.alpha


class Order:
    """fifo / lifo by insertion sequence: a ring of (slot, seq) entries, stale ones skipped.

    A removed or overwritten slot leaves a stale entry behind (its seq no longer matches);
    scans skip those in vectorized windows, and `_compact` drops them when the ring fills.
    """

    deterministic = True

    def __init__(self, capacity: int, lifo: bool):
        self.lifo = lifo
        self.size = 2 * capacity + 64
        self.ring_slot = np.zeros(self.size, np.int64)
        self.ring_seq = np.zeros(self.size, np.int64)
        self.cur_seq = np.full(capacity, -1, np.int64)
        self.head = 0  # oldest entry (monotonic counters; index = counter % size)
        self.tail = 0  # one past the newest

    def insert(self, slots: np.ndarray, seqs: np.ndarray, priorities: np.ndarray) -> None:
        """Append (slot, seq) entries at the tail, compacting first when the ring is full."""
        if self.tail - self.head + len(slots) > self.size:
            self._compact()
        idx = (self.tail + np.arange(len(slots))) % self.size
        self.ring_slot[idx] = slots
        self.ring_seq[idx] = seqs
        self.cur_seq[slots] = seqs
        self.tail += len(slots)

    def remove(self, slots: np.ndarray) -> None:
        """Mark the slots' entries stale (later scans skip them)."""
        self.cur_seq[slots] = -1

    def update(self, slots: np.ndarray, priorities: np.ndarray) -> None:
        """Nothing to do: the order is by insertion, not priority."""
        pass

    def sample(self, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """The oldest (fifo) or newest (lifo) item, k times, probability 1."""
        first = self._take(1, remove=False)
        return np.repeat(first, k), np.ones(k)

    def pop(self, k: int, rng: np.random.Generator) -> np.ndarray:
        """The k oldest (fifo) or newest (lifo) items, removed."""
        return self._take(k, remove=True)

    def _take(self, k: int, remove: bool) -> np.ndarray:
        """The first k live slots from the front (fifo) or back (lifo)."""
        found: list[np.ndarray] = []
        need = k
        while need > 0 and self.tail > self.head:
            window = min(max(2 * need, 64), self.tail - self.head)
            step = np.arange(window)
            counters = self.tail - 1 - step if self.lifo else self.head + step
            idx = counters % self.size
            slots = self.ring_slot[idx]
            valid = self.cur_seq[slots] == self.ring_seq[idx]
            picked = np.flatnonzero(valid)[:need]
            found.append(slots[picked])
            need -= len(picked)
            if remove:  # picked entries and the stale ones between them are used up
                advance = int(picked[-1]) + 1 if need == 0 else window
            else:  # only the leading stale entries can go; the picked item stays
                advance = int(picked[0]) if len(picked) else window
            if self.lifo:
                self.tail -= advance
            else:
                self.head += advance
        slots = np.concatenate(found) if found else np.zeros(0, np.int64)
        if remove:
            self.cur_seq[slots] = -1
        return slots

    def _compact(self) -> None:
        counters = self.head + np.arange(self.tail - self.head)
        idx = counters % self.size
        slots, seqs = self.ring_slot[idx], self.ring_seq[idx]
        keep = self.cur_seq[slots] == seqs
        n = int(keep.sum())
        self.ring_slot[:n], self.ring_seq[:n] = slots[keep], seqs[keep]
        self.head, self.tail = 0, n


class Heap:
    """min_heap / max_heap by priority: a binary heap with lazy deletion.

    An entry is live while its slot still holds the same (seq, priority); updates push a
    new entry and leave the old one stale. The heap is rebuilt from live entries when
    stale ones outnumber live ones, which bounds its memory at about twice the table.
    """

    deterministic = True

    def __init__(self, capacity: int, largest: bool):
        self.sign = -1.0 if largest else 1.0
        self.heap: list[tuple[float, int, int]] = []
        self.cur_seq = np.full(capacity, -1, np.int64)
        self.cur_key = np.zeros(capacity, np.float64)
        self.n = 0

    def insert(self, slots: np.ndarray, seqs: np.ndarray, priorities: np.ndarray) -> None:
        """Push an entry per new item; rebuild when stale entries pile up."""
        self.n += int((self.cur_seq[slots] < 0).sum())
        self.cur_seq[slots] = seqs
        keys = self.sign * np.asarray(priorities, np.float64)
        self.cur_key[slots] = keys
        for key, slot, seq in zip(keys.tolist(), slots.tolist(), seqs.tolist(), strict=True):
            heapq.heappush(self.heap, (key, seq, slot))
        self._maybe_rebuild()

    def remove(self, slots: np.ndarray) -> None:
        """Mark the slots dead: their heap entries go stale."""
        live = slots[self.cur_seq[slots] >= 0]
        self.n -= len(np.unique(live))
        self.cur_seq[live] = -1

    def update(self, slots: np.ndarray, priorities: np.ndarray) -> None:
        """Push each live item's new priority: its old entry goes stale."""
        keys = self.sign * np.asarray(priorities, np.float64)
        for key, slot in zip(keys.tolist(), slots.tolist(), strict=True):
            seq = int(self.cur_seq[slot])
            if seq >= 0:
                self.cur_key[slot] = key
                heapq.heappush(self.heap, (key, seq, slot))
        self._maybe_rebuild()

    def sample(self, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """The item of smallest (min_heap) or largest (max_heap) priority, k times, probability 1."""
        self._drop_stale()
        return np.full(k, self.heap[0][2], np.int64), np.ones(k)

    def pop(self, k: int, rng: np.random.Generator) -> np.ndarray:
        """The k items of smallest (min_heap) or largest (max_heap) priority, removed."""
        out = []
        for _ in range(k):
            self._drop_stale()
            _, _, slot = heapq.heappop(self.heap)
            self.cur_seq[slot] = -1
            self.n -= 1
            out.append(slot)
        return np.asarray(out, np.int64)

    def _live(self, entry: tuple[float, int, int]) -> bool:
        key, seq, slot = entry
        return self.cur_seq[slot] == seq and self.cur_key[slot] == key

    def _drop_stale(self) -> None:
        while self.heap and not self._live(self.heap[0]):
            heapq.heappop(self.heap)

    def _maybe_rebuild(self) -> None:
        if len(self.heap) > 2 * self.n + 1024:
            self.heap = [e for e in self.heap if self._live(e)]
            heapq.heapify(self.heap)
