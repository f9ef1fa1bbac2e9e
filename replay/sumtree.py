"""Sum-tree and min-tree over a table's slots: the index behind prioritized sampling.

Place in the data flow: replay/selectors.py (`Prioritized`) keeps one of these per table;
the shard's sample path descends it once per batch, priority updates from learners
write its leaves. Everything is vectorized over the batch: an update of k leaves or a
sample of k items costs O(k log n) numpy work, never O(n).

Invariants: leaves hold p**alpha (float64, >= 0; 0 for an empty slot); every internal
node is the sum (min) of its children up to rounding. Incremental updates add rounding
error to the upper levels, so `rebuild` recomputes every level from the leaves every
`rebuild_every` leaf writes (O(n), amortized to O(1) per write).
"""

from __future__ import annotations

import numpy as np

REBUILD_EVERY = 1 << 20  # leaf writes between full rebuilds against rounding drift


class SumTree:
    """Example:
    tree = SumTree(capacity=1000)
    tree.set(np.array([3, 7]), np.array([1.0, 2.0]))
    leaves = tree.find(np.random.default_rng(0).random(32) * tree.total)
    """

    def __init__(self, capacity: int, rebuild_every: int = REBUILD_EVERY):
        self.capacity = capacity
        self.leaves = 1 << max(0, int(capacity - 1).bit_length())  # power of two >= capacity
        self.depth = self.leaves.bit_length() - 1
        self.sums = np.zeros(2 * self.leaves, np.float64)
        self.mins = np.full(2 * self.leaves, np.inf, np.float64)
        self.rebuild_every = rebuild_every
        self.writes = 0

    @property
    def total(self) -> float:
        return float(self.sums[1])

    @property
    def min(self) -> float:
        """Smallest non-zero leaf (inf when the tree is empty)."""
        return float(self.mins[1])

    def get(self, idx: np.ndarray) -> np.ndarray:
        return self.sums[self.leaves + idx]

    def set(self, idx: np.ndarray, values: np.ndarray) -> None:
        """Write leaves (duplicates: the last value wins) and fix their ancestors."""
        idx = np.asarray(idx, np.int64)
        if idx.size == 0:
            return
        values = np.broadcast_to(np.asarray(values, np.float64), idx.shape)
        nodes = idx + self.leaves
        self.sums[nodes] = values  # fancy assignment: the last duplicate wins
        # An empty slot must not be the minimum: the min-tree ignores zero leaves.
        self.mins[nodes] = np.where(values > 0, values, np.inf)
        self.writes += idx.size
        if self.writes >= self.rebuild_every:
            self.rebuild()
            return
        # Level by level up to the root. Duplicate parents are not removed: each copy
        # writes the same sum (all reads of a level happen before its writes), and
        # skipping np.unique's sort per level halves the cost of a batch update.
        for _ in range(self.depth):
            nodes >>= 1
            left = nodes << 1
            self.sums[nodes] = self.sums[left] + self.sums[left + 1]
            self.mins[nodes] = np.minimum(self.mins[left], self.mins[left + 1])

    def find(self, mass: np.ndarray) -> np.ndarray:
        """Leaf index for each prefix mass in [0, total): one vectorized root-to-leaf descent."""
        mass = np.array(mass, np.float64)
        node = np.ones(mass.shape, np.int64)
        sums = self.sums
        for _ in range(self.depth):
            node <<= 1  # the left child
            lsum = sums[node]
            # Rounding can leave mass >= a subtree's sum; never step into an empty subtree,
            # so a zero-priority (empty) leaf is never returned while the tree is non-empty.
            right = ((mass >= lsum) & (sums[node + 1] > 0)) | (lsum <= 0)
            mass -= lsum * right
            node += right
        return node - self.leaves

    def rebuild(self) -> None:
        """Recompute every internal node from the leaves (drops accumulated rounding error)."""
        lo = self.leaves
        while lo > 1:
            hi = 2 * lo
            half = lo // 2
            self.sums[half:lo] = self.sums[lo:hi:2] + self.sums[lo + 1 : hi : 2]
            self.mins[half:lo] = np.minimum(self.mins[lo:hi:2], self.mins[lo + 1 : hi : 2])
            lo = half
        self.writes = 0
