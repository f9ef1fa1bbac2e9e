"""One replay table: fixed slots of numpy columns, a sampler, a remover, per-slot metadata.

Place in the data flow: replay/server.py routes each insert, sample and priority update to
a Table by name. Actors' chunks land in free slots (or evict what the remover picks);
learners' samples come out as gathered columns plus each item's address
(slot, generation) and sampling weight, which is what lets a priority update find
its item again and lets the learner compute unbiased importance weights.

Invariants:
- A table learns its signature (name -> dtype, shape per item) from the first insert and
  rejects any later chunk that differs, so one bad client cannot corrupt the columns.
- `gen[slot]` grows on every write to the slot: an update addressed to (slot, gen) for an
  item since overwritten or removed no longer matches and is dropped.
- Capacity is bounded in items and, when `max_bytes` is set, in bytes: the item count is
  cut to what fits once the first insert reveals the item size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cluster.errors import ProtocolError
from replay import selectors

PRIORITY = "priority"  # optional insert column: initial priorities, not stored as data


@dataclass
class Sampled:
    arrays: dict[str, np.ndarray]  # gathered columns
    slots: np.ndarray  # int64
    gens: np.ndarray  # int64 generation of each slot when sampled
    probs: np.ndarray  # float64 probability of each draw within this table
    total: float  # sum of sampling weights (p**alpha, or 1 per item for uniform)
    min_weight: float  # smallest non-zero sampling weight


class Table:
    """Example:
    t = Table(capacity=1000, sampler="prioritized", remover="fifo")
    t.insert({"obs": np.zeros((64, 4), np.float32), "action": np.zeros(64, np.int64)})
    s = t.sample(32, np.random.default_rng(0))
    t.update_priorities(s.slots, s.gens, np.ones(32))
    """

    def __init__(
        self,
        capacity: int,
        sampler: str = "uniform",
        remover: str = "fifo",
        max_times_sampled: int = 0,
        priority_exponent: float = 0.6,
        max_bytes: int = 0,
        name: str = "main",
        seed: int = 0,
    ):
        if remover == "prioritized":
            raise ValueError("remover 'prioritized' is not supported; use uniform, fifo, lifo or a heap")
        selectors.make(sampler, 1, priority_exponent)  # fail fast on an unknown name
        selectors.make(remover, 1)
        self.name = name
        self.rng = np.random.default_rng(seed)  # for a uniform remover's draws
        self.requested_capacity = capacity
        self.capacity = capacity
        self.sampler_kind, self.remover_kind = sampler, remover
        self.max_times_sampled = max_times_sampled
        self.alpha = priority_exponent
        self.max_bytes = max_bytes
        self.columns: dict[str, np.ndarray] = {}
        self.size = 0
        self.inserted = 0
        self.removed_total = 0
        self.updates_applied = 0
        self.updates_dropped = 0
        self.max_priority = 1.0  # new items without a priority get the largest seen (PER)

    # -- layout -----------------------------------------------------------------------

    def _allocate(self, arrays: dict[str, np.ndarray]) -> None:
        item_bytes = sum(a[0].nbytes for a in arrays.values()) + self.META_BYTES
        if self.max_bytes:
            fits = self.max_bytes // item_bytes
            if fits < 1:
                raise ProtocolError(f"one item of {item_bytes} bytes exceeds the table's {self.max_bytes}")
            self.capacity = min(self.requested_capacity, int(fits))
        cap = self.capacity
        self.columns = {k: np.zeros((cap, *a.shape[1:]), dtype=a.dtype) for k, a in arrays.items()}
        self.gen = np.zeros(cap, np.int64)
        self.seq = np.full(cap, -1, np.int64)  # insertion number; -1: empty slot
        self.times = np.zeros(cap, np.int32)
        self.prio = np.zeros(cap, np.float64)
        self.free = np.arange(cap - 1, -1, -1, dtype=np.int64)  # a stack: pops 0, 1, 2, ...
        self.nfree = cap
        self.sampler = selectors.make(self.sampler_kind, cap, self.alpha)
        self.remover = selectors.make(self.remover_kind, cap)
        self.seq_sum = 0  # running sum of live seqs: mean age without an O(n) pass

    # gen, seq, prio (8 bytes each), times (4) + selector indexes (about 16-32)
    META_BYTES = 28 + 32

    @property
    def nbytes(self) -> int:
        if not self.columns:
            return 0
        return sum(c.nbytes for c in self.columns.values()) + self.capacity * self.META_BYTES

    def signature(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {k: (c.dtype.str, c.shape[1:]) for k, c in self.columns.items()}

    # -- writes ---------------------------------------------------------------------------

    def check(self, arrays: dict[str, np.ndarray]) -> int:
        """The chunk length, or ProtocolError when the chunk does not fit this table."""
        if not arrays:
            raise ProtocolError("insert carries no arrays")
        lengths = {a.shape[0] if a.ndim else -1 for a in arrays.values()}
        if len(lengths) != 1 or -1 in lengths or 0 in lengths:
            raise ProtocolError("insert arrays must share one non-zero leading length")
        data = {k: a for k, a in arrays.items() if k != PRIORITY}
        if not data:
            raise ProtocolError("insert carries only priorities")
        if PRIORITY in arrays:
            p = arrays[PRIORITY]
            if p.ndim != 1 or p.dtype.kind != "f" or not np.isfinite(p).all() or (p < 0).any():
                raise ProtocolError("insert priorities must be finite floats >= 0, one per item")
        if self.columns:
            got = {k: (a.dtype.str, a.shape[1:]) for k, a in data.items()}
            if got != self.signature():
                raise ProtocolError(f"insert signature {got} differs from table {self.signature()}")
        return lengths.pop()

    def insert(self, arrays: dict[str, np.ndarray]) -> int:
        """Store a chunk (every array has the same leading length); returns the chunk length."""
        n = self.check(arrays)
        prio = arrays.get(PRIORITY)
        data = {k: a for k, a in arrays.items() if k != PRIORITY}
        if not self.columns:
            self._allocate(data)
        kept = min(n, self.capacity)  # of a chunk larger than the table, keep the newest
        if kept < n:
            data = {k: a[n - kept :] for k, a in data.items()}
            prio = prio[n - kept :] if prio is not None else None
        take = min(kept, self.nfree)
        slots = self.free[self.nfree - take : self.nfree][::-1]
        self.nfree -= take
        if kept > take:
            evicted = self.remover.pop(kept - take, self.rng)
            self._forget(evicted, remover_done=True, free=False)
            slots = np.concatenate([slots, evicted])
        for k, a in data.items():
            self.columns[k][slots] = a
        seqs = self.inserted + (n - kept) + np.arange(kept, dtype=np.int64)
        priorities = np.asarray(prio, np.float64) if prio is not None else np.full(kept, self.max_priority)
        if prio is not None and kept:
            self.max_priority = max(self.max_priority, float(priorities.max()))
        self.gen[slots] += 1
        self.seq[slots] = seqs
        self.times[slots] = 0
        self.prio[slots] = priorities
        self.seq_sum += int(seqs.sum())
        self.sampler.insert(slots, seqs, priorities)
        self.remover.insert(slots, seqs, priorities)
        self.size += kept
        self.inserted += n
        return n

    def remove(self, slots: np.ndarray) -> None:
        """Delete items (e.g. sampled max_times_sampled times); their slots become free."""
        self._forget(np.unique(slots[self.seq[slots] >= 0]), remover_done=False, free=True)

    def _forget(self, slots: np.ndarray, remover_done: bool, free: bool) -> None:
        self.sampler.remove(slots)
        if not remover_done:
            self.remover.remove(slots)
        self.seq_sum -= int(self.seq[slots].sum())
        self.seq[slots] = -1
        self.gen[slots] += 1  # a pending priority update for the old item must not match
        if free:  # an evicted slot is rewritten at once instead
            self.free[self.nfree : self.nfree + len(slots)] = slots
            self.nfree += len(slots)
        self.size -= len(slots)
        self.removed_total += len(slots)

    def update_priorities(self, slots: np.ndarray, gens: np.ndarray, priorities: np.ndarray) -> int:
        """Apply updates whose (slot, gen) still names a stored item; returns how many applied."""
        slots = np.asarray(slots, np.int64)
        gens = np.asarray(gens, np.int64)
        p = np.asarray(priorities, np.float64)
        if not (slots.shape == gens.shape == p.shape and slots.ndim == 1):
            raise ProtocolError("priority update needs 1-d slot, gen and priority of one length")
        if not np.isfinite(p).all() or (p < 0).any():
            raise ProtocolError("priorities must be finite and >= 0")
        if not self.columns:
            self.updates_dropped += len(slots)
            return 0
        inside = (slots >= 0) & (slots < self.capacity)
        ok = inside.copy()
        ok[inside] = (self.gen[slots[inside]] == gens[inside]) & (self.seq[slots[inside]] >= 0)
        slots, p = slots[ok], p[ok]
        self.prio[slots] = p
        self.sampler.update(slots, p)
        self.remover.update(slots, p)
        if len(p):
            self.max_priority = max(self.max_priority, float(p.max()))
        self.updates_applied += len(slots)
        self.updates_dropped += int((~ok).sum())
        return len(slots)

    # -- reads ----------------------------------------------------------------------------

    def sample(self, batch: int, rng: np.random.Generator) -> Sampled:
        """Draw `batch` items with replacement (fewer when max_times_sampled empties the table)."""
        if self.size == 0:
            raise ValueError("cannot sample an empty table")
        total, smallest = self.weights()
        if self.max_times_sampled == 0:
            slots, probs = self.sampler.sample(batch, rng)
            np.add.at(self.times, slots, 1)
        else:
            # Each draw may remove its item, which changes the next draw: one at a time.
            got_s, got_p, got_g = [], [], []
            for _ in range(batch):
                if self.size == 0:
                    break
                s, p = self.sampler.sample(1, rng)
                got_s.append(int(s[0]))
                got_p.append(float(p[0]))
                got_g.append(int(self.gen[s[0]]))  # before a removal bumps it
                self.times[s] += 1
                if self.times[s[0]] >= self.max_times_sampled:
                    self.remove(s)
            slots, probs = np.asarray(got_s, np.int64), np.asarray(got_p, np.float64)
            arrays = {k: c[slots] for k, c in self.columns.items()}
            return Sampled(arrays, slots, np.asarray(got_g, np.int64), probs, total, smallest)
        arrays = {k: c[slots] for k, c in self.columns.items()}
        return Sampled(arrays, slots, self.gen[slots].copy(), probs, total, smallest)

    def weights(self) -> tuple[float, float]:
        """(total, smallest) sampling weight over stored items, as the sampler sees them."""
        if isinstance(self.sampler, selectors.Prioritized | selectors.Uniform):
            return self.sampler.weights()
        return float(self.size), 1.0  # deterministic samplers: report counts

    def stats(self) -> dict[str, float | int | str]:
        """Memory, age and priority summary (cheap: no pass over every slot)."""
        out: dict[str, float | int | str] = {
            "items": self.size,
            "capacity": self.capacity,
            "bytes": self.nbytes,
            "inserted_total": self.inserted,
            "removed_total": self.removed_total,
            "priority_updates_total": self.updates_applied,
            "priority_updates_dropped_total": self.updates_dropped,
            "sampler": self.sampler_kind,
            "remover": self.remover_kind,
        }
        if self.size:
            out["age_mean_items"] = round(self.inserted - 1 - self.seq_sum / self.size, 1)
            total, smallest = self.weights()
            out["priority_total"] = total
            out["priority_max"] = self.max_priority
            out["priority_min"] = smallest ** (1 / self.alpha) if self.sampler_kind == "prioritized" else 1.0
        return out
