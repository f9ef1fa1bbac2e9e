"""Sum-tree over a table's slots, and their smallest non-zero leaf: the index behind
prioritized sampling.

Place in the data flow: replay/selectors.py (`Prioritized`) keeps one of these per table;
the shard's sample path descends it once per batch, priority updates from learners
write its leaves. Everything is vectorized over the batch: an update of k leaves or a
sample of k items costs O(k log n) numpy work, never O(n).

Invariants: leaves hold p**alpha (float64, >= 0; 0 for an empty slot); every internal
node is the sum of its children up to rounding. Incremental updates add rounding
error to the upper levels, so `rebuild` recomputes every level from the leaves every
`rebuild_every` leaf writes (O(n), amortized to O(1) per write).
The smallest non-zero leaf (`min`, what importance weights are normalised by) is kept
exactly without a min-tree, with the number of leaves holding it: a write can only
lower it, unless it changes every leaf holding it; only then is it recomputed, by one
O(n) scan when next read. Priority updates and evictions rarely change all the smallest
leaves at once, so this costs a few numpy calls per write instead of a second tree's
log n levels.
"""

from __future__ import annotations

import numpy as np

REBUILD_EVERY = 1 << 20  # leaf writes between full rebuilds against rounding drift
WHOLE_LEVEL = 2048  # a level of at most this many nodes costs less summed whole than node by node


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
        self._min = np.inf  # smallest non-zero leaf, exact unless _min_stale
        self._min_count = 0  # leaves holding it
        self._min_stale = False
        self.rebuild_every = rebuild_every
        self.writes = 0

    @property
    def total(self) -> float:
        """Sum of every leaf (the root)."""
        return float(self.sums[1])

    @property
    def min(self) -> float:
        """Smallest non-zero leaf (inf when the tree is empty)."""
        if self._min_stale:
            leaves = self.sums[self.leaves :]
            self._min = float(np.min(leaves, where=leaves > 0, initial=np.inf))
            self._min_count = int(np.count_nonzero(leaves == self._min)) if self._min < np.inf else 0
            self._min_stale = False
        return self._min

    def get(self, idx: np.ndarray) -> np.ndarray:
        """The leaves at `idx`."""
        return self.sums[self.leaves + idx]

    def set(self, idx: np.ndarray, values: np.ndarray) -> None:
        """Write leaves (duplicates: the last value wins) and fix their ancestors."""
        idx = np.asarray(idx, np.int64)
        if idx.size == 0:
            return
        values = np.broadcast_to(np.asarray(values, np.float64), idx.shape)
        nodes = idx + self.leaves
        if not self._min_stale:  # leaves holding the minimum that this write changes
            held = nodes[self.sums.take(nodes) == self._min]
            if len(held):
                self._min_count -= len(np.unique(held))
        self.sums[nodes] = values  # fancy assignment: the last duplicate wins
        if not self._min_stale:
            written = self.sums.take(nodes)  # a duplicate's last value, as stored
            low = float(np.min(written, where=written > 0, initial=np.inf))
            if low < self._min:
                self._min, self._min_count = low, 0
            if low == self._min and low < np.inf:
                self._min_count += len(np.unique(nodes[written == low]))
            self._min_stale = self._min_count <= 0 and self._min < np.inf
        self.writes += idx.size
        if self.writes >= self.rebuild_every:
            self.rebuild()
            return
        # Level by level up to the root. Duplicate parents are not removed: each copy
        # writes the same sum (all reads of a level happen before its writes), and
        # skipping np.unique's sort per level halves the cost of a batch update.
        # Children 2i and 2i+1 are row i of the [n, 2] view: one take per level.
        # Levels of few nodes are summed whole instead: one numpy call, not four, and the
        # same values (every node always holds the sum of its two children).
        sums = self.sums
        pairs = sums.reshape(-1, 2)
        whole = max(WHOLE_LEVEL, 4 * idx.size)
        size = self.leaves  # nodes on the level just written
        while size > 1:
            size >>= 1
            if size <= whole:
                np.add(
                    sums[2 * size : 4 * size : 2],
                    sums[2 * size + 1 : 4 * size : 2],
                    out=sums[size : 2 * size],
                )
                continue
            nodes >>= 1
            pair = pairs.take(nodes, axis=0)
            sums[nodes] = pair[:, 0] + pair[:, 1]

    def find(self, mass: np.ndarray) -> np.ndarray:
        """Leaf index for each prefix mass in [0, total): one vectorized root-to-leaf descent.

        Six numpy calls per level, into preallocated buffers. Only rounding (a mass at or
        past a subtree's sum) can lead that plain descent into an empty subtree; it then
        ends on an empty leaf, and those few masses descend again with `_find_guarded`,
        which never steps into an empty subtree, so the result is exactly its result.
        """
        mass = np.array(mass, np.float64)
        if mass.ndim != 1:
            return self._find_guarded(mass)
        left = mass.copy()
        node = np.ones(mass.shape, np.int64)
        lsum = np.empty(mass.shape, np.float64)
        right = np.empty(mass.shape, bool)
        sums = self.sums
        for _ in range(self.depth):
            node <<= 1  # the left child
            sums.take(node, out=lsum)
            np.greater_equal(left, lsum, out=right)  # an empty left child (0) is never taken
            lsum *= right
            left -= lsum
            node += right
        empty = sums.take(node) <= 0
        leaf = node - self.leaves
        if empty.any() and self.total > 0:
            leaf[empty] = self._find_guarded(mass[empty])
        return leaf

    def _find_guarded(self, mass: np.ndarray) -> np.ndarray:
        """`find` that checks the right sibling at every level (twice the numpy calls)."""
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
            lo = half
        self.writes = 0
        self._min_stale = True
