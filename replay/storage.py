"""Bounded ring storage for one replay table: columns of numpy arrays, uniform sampling.

A table learns its signature (name -> dtype, shape per item) from the first insert and
rejects any later insert that differs, so one bad client cannot corrupt the columns.
"""

from __future__ import annotations

import numpy as np

from cluster.errors import ProtocolError


class Table:
    """Fixed-capacity FIFO-overwrite table of transitions.

    Example:
        t = Table(capacity=1000)
        t.insert({"obs": np.zeros((64, 4), np.float32), "action": np.zeros(64, np.int64)})
        batch, slots = t.sample(32, np.random.default_rng(0))
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.columns: dict[str, np.ndarray] = {}
        self.size = 0
        self.cursor = 0
        self.inserted = 0

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.columns.values())

    def signature(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {k: (c.dtype.str, c.shape[1:]) for k, c in self.columns.items()}

    def insert(self, arrays: dict[str, np.ndarray]) -> int:
        """Append a chunk (every array has the same leading length); returns the chunk length."""
        n = self.check(arrays)
        if not self.columns:
            self.columns = {
                k: np.zeros((self.capacity, *a.shape[1:]), dtype=a.dtype) for k, a in arrays.items()
            }
        n_kept = min(n, self.capacity)
        slots = (self.cursor + np.arange(n - n_kept, n)) % self.capacity
        for k, a in arrays.items():
            self.columns[k][slots] = a[n - n_kept :]
        self.cursor = (self.cursor + n) % self.capacity
        self.size = min(self.capacity, self.size + n)
        self.inserted += n
        return n

    def sample(self, batch: int, rng: np.random.Generator) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Uniform sample with replacement; returns gathered columns and the slots used."""
        if self.size == 0:
            raise ValueError("cannot sample an empty table")
        slots = rng.integers(0, self.size, size=batch)
        return {k: c[slots] for k, c in self.columns.items()}, slots

    def check(self, arrays: dict[str, np.ndarray]) -> int:
        """The chunk length, or ProtocolError when the chunk does not fit this table."""
        if not arrays:
            raise ProtocolError("insert carries no arrays")
        lengths = {a.shape[0] if a.ndim else -1 for a in arrays.values()}
        if len(lengths) != 1 or -1 in lengths or 0 in lengths:
            raise ProtocolError("insert arrays must share one non-zero leading length")
        if self.columns:
            got = {k: (a.dtype.str, a.shape[1:]) for k, a in arrays.items()}
            if got != self.signature():
                raise ProtocolError(f"insert signature {got} differs from table {self.signature()}")
        return lengths.pop()
