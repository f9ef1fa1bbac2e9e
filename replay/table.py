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
- A pixel table (its first insert carries `frame` columns, see replay/frames.py) stores
  each frame once in a FrameStore and per item only the frame slots of its obs and
  next_obs stacks; sampling rebuilds both stacks. When the frame ring runs out, the remover
  evicts items until their frames are free.
- `export` / `load` carry everything a restarted shard needs (replay/snapshot.py): the
  columns, per-slot metadata and counters; selectors are rebuilt from seq and priority.

Queues (`is_queue`, Reverb's queue) carry whole unrolls to an on-policy learner, which must
see each exactly once: a lost one would bias its gradient. So a queue never evicts an
unread item: a chunk goes in whole once it fits (`room`; the shard parks it until samples
make room), one larger than the queue is refused, and a draw takes the oldest items.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from canopy.errors import ProtocolError
from canopy.replay import frameindex, selectors
from canopy.replay.frames import (
    FRAME,
    FRAME_KEY,
    FRAME_PREV,
    STACKED,
    FrameStore,
    check_columns,
    check_refs,
    split,
)
from canopy.replay.packed import INDEX

PRIORITY = "priority"  # optional insert column: initial priorities, not stored as data
# Counts a snapshot carries besides the arrays (each an attribute of the same name).
_COUNTS = ("size", "inserted", "removed_total", "updates_applied", "updates_dropped", "nfree")


@dataclass
class Sampled:
    """One sampled batch: the gathered columns plus each item's address and probability."""

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
        frame_stack: int = 4,
        frame_window: int = 65_536,
    ):
        if remover == "prioritized":
            raise ValueError("remover 'prioritized' is not supported; use uniform, fifo, lifo or a heap")
        selectors.make(sampler, 1, priority_exponent)  # fail fast on an unknown name
        selectors.make(remover, 1)
        self.name = name
        self.rng = np.random.default_rng(seed)  # for a uniform remover's draws
        self.requested_capacity = self.capacity = capacity
        self.sampler_kind, self.remover_kind = sampler, remover
        self.max_times_sampled = max_times_sampled
        self.alpha, self.max_bytes = priority_exponent, max_bytes
        self.frame_stack, self.frame_window = frame_stack, frame_window
        self.allocated = False  # the first insert sizes every array
        self.columns: dict[str, np.ndarray] = {}
        self.frames: FrameStore | None = None  # set by the first insert of a pixel table
        self.stacked: dict[str, np.ndarray] = {}  # pixel tables: obs/next_obs -> [cap, stack] frame slots
        self.size = self.inserted = self.removed_total = self.updates_applied = self.updates_dropped = 0
        self.max_priority = 1.0  # new items without a priority get the largest seen (PER)

    @property
    def is_queue(self) -> bool:
        """Reverb's queue: a fifo sampler whose one draw removes the item (each out once, oldest first)."""
        return self.sampler_kind == "fifo" and self.max_times_sampled == 1

    def room(self, n: int) -> bool:
        """Whether `n` items may go in now: always in a ring (it evicts), in a queue if they fit."""
        return not self.is_queue or self.size + n <= self.capacity

    # -- layout -----------------------------------------------------------------------

    def _fit(self, arrays: dict[str, np.ndarray], frames: dict[str, np.ndarray]) -> int:
        """The item capacity for items like these: `capacity`, cut to what `max_bytes` holds."""
        arrays = {k: a for k, a in arrays.items() if k not in STACKED} if frames else arrays
        item_bytes = sum(a[0].nbytes for a in arrays.values()) + self.META_BYTES
        if frames:  # about one new frame per item, plus its two stacks of slots
            item_bytes += frames[FRAME][0].nbytes + 2 * 4 * self.frame_stack
        fits = self.max_bytes // item_bytes if self.max_bytes else self.requested_capacity
        if fits < 1:
            raise ProtocolError(f"one item of {item_bytes} bytes exceeds the table's {self.max_bytes}")
        return min(self.requested_capacity, int(fits))

    def _allocate(self, arrays: dict[str, np.ndarray], frames: dict[str, np.ndarray]) -> None:
        self.capacity = cap = self._fit(arrays, frames)
        if frames:
            arrays = {k: a for k, a in arrays.items() if k not in STACKED}
        self.columns = {k: np.zeros((cap, *a.shape[1:]), dtype=a.dtype) for k, a in arrays.items()}
        if frames:
            self.stacked = {k: np.zeros((cap, self.frame_stack), np.int32) for k in STACKED}
            # Episode starts need a frame beyond one per item; the pin window holds frames
            # no item names yet. Spare ring room is virtual memory until a frame lands in it.
            ring = cap + cap // 2 + self.frame_window + 1024
            self.frames = FrameStore(ring, frames[FRAME].shape[1:], self.frame_stack, self.frame_window)
        self.gen = np.zeros(cap, np.int64)
        self.seq = np.full(cap, -1, np.int64)  # insertion number; -1: empty slot
        self.times = np.zeros(cap, np.int32)
        self.prio = np.zeros(cap, np.float64)
        self.free = np.arange(cap - 1, -1, -1, dtype=np.int64)  # a stack: pops 0, 1, 2, ...
        self.nfree = cap
        self.sampler = selectors.make(self.sampler_kind, cap, self.alpha)
        self.remover = selectors.make(self.remover_kind, cap)
        self.seq_sum = 0  # running sum of live seqs: mean age without an O(n) pass
        self.allocated = True

    # gen, seq, prio (8 bytes each), times (4) + selector indexes (about 16-32)
    META_BYTES = 28 + 32

    @property
    def nbytes(self) -> int:
        """Bytes of the columns, per-slot metadata and frames (0 before the first insert)."""
        if not self.allocated:
            return 0
        total = sum(c.nbytes for c in self.columns.values()) + self.capacity * self.META_BYTES
        if self.frames is not None:
            total += sum(c.nbytes for c in self.stacked.values()) + self.frames.nbytes
        return total

    def signature(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """name -> (dtype, item shape) each insert must match (pixel tables: obs/next_obs as int64 keys)."""
        sig = {k: (c.dtype.str, c.shape[1:]) for k, c in self.columns.items()}
        if self.frames is not None:  # obs and next_obs arrive as frame keys
            sig.update({k: (np.dtype(np.int64).str, ()) for k in STACKED})
        return sig

    # -- writes ---------------------------------------------------------------------------

    def check(self, arrays: dict[str, np.ndarray]) -> int:
        """The chunk length, or ProtocolError when the chunk does not fit this table."""
        frames, arrays = split(arrays)
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
        if self.allocated:
            got = {k: (a.dtype.str, a.shape[1:]) for k, a in data.items()}
            if got != self.signature():
                raise ProtocolError(f"insert signature {got} differs from table {self.signature()}")
            if bool(frames) != (self.frames is not None):
                kind = "pixel (frame columns)" if self.frames is not None else "whole-observation"
                raise ProtocolError(f"table {self.name!r} is a {kind} table; this insert is not")
        if self.frames is not None:
            self.frames.check(frames, data)
        elif frames:  # the first pixel insert: every key must be one of its own frames
            check_columns(frames, data)
            check_refs(frames, data, {}, self.frame_window)
        n = lengths.pop()
        if self.is_queue and n > (cap := self.capacity if self.allocated else self._fit(data, frames)):
            raise ProtocolError(
                f"queue table {self.name!r} holds {cap} items, this chunk has {n} and could never "
                "fit: send smaller chunks or raise the capacity in its replay.extra_tables entry"
            )
        return n

    def insert(self, arrays: dict[str, np.ndarray]) -> int:
        """Store a chunk (every array has the same leading length); returns the chunk length."""
        n = self.check(arrays)
        if not self.room(n):  # the shard parks such a chunk instead (replay/server.py)
            raise ProtocolError(f"queue table {self.name!r} is full: {self.size} unread items")
        frames, arrays = split(arrays)
        prio = arrays.get(PRIORITY)
        data = {k: a for k, a in arrays.items() if k != PRIORITY}
        if not self.allocated:
            self._allocate(data, frames)
        stacks: dict[str, np.ndarray] = {}
        if self.frames is not None:
            self._make_frame_room(len(frames[FRAME_KEY]))
            self.frames.add(frames[FRAME_KEY], frames[FRAME_PREV], frames[FRAME])
            stacks = {k: self.frames.stacks(data.pop(k)) for k in STACKED}
        kept = min(n, self.capacity)  # of a chunk larger than the table, keep the newest
        if kept < n:
            data = {k: a[n - kept :] for k, a in data.items()}
            stacks = {k: a[n - kept :] for k, a in stacks.items()}
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
        for k, a in stacks.items():
            self.stacked[k][slots] = a
            self.frames.acquire(a)
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
        if self.frames is not None:
            self.frames.unpin_overflow()  # only now: this insert's stacks needed those pins
        return n

    def _make_frame_room(self, need: int) -> None:
        while self.frames.nfree < need:
            if self.size == 0 or self.is_queue:  # a queue never evicts an unread item
                raise ProtocolError(
                    f"table {self.name!r}: no room for {need} frames beside the pinned ones; "
                    "send smaller chunks or lower replay.frame_window"
                )
            evicted = self.remover.pop(min(self.size, need - self.frames.nfree), self.rng)
            self._forget(evicted, remover_done=True, free=True)

    def remove(self, slots: np.ndarray) -> None:
        """Delete items (e.g. sampled max_times_sampled times); their slots become free."""
        self._forget(np.unique(slots[self.seq[slots] >= 0]), remover_done=False, free=True)

    def _forget(self, slots: np.ndarray, remover_done: bool, free: bool) -> None:
        self.sampler.remove(slots)
        if not remover_done:
            self.remover.remove(slots)
        for stacks in self.stacked.values():
            self.frames.release(stacks[slots])
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
        if not self.allocated:
            self.updates_dropped += len(slots)
            return 0
        inside = (slots >= 0) & (slots < self.capacity)
        if inside.all():  # the usual case: one vectorized generation check, no masking
            ok = (self.gen.take(slots) == gens) & (self.seq.take(slots) >= 0)
        else:
            ok = inside.copy()
            ok[inside] = (self.gen[slots[inside]] == gens[inside]) & (self.seq[slots[inside]] >= 0)
        if not ok.all():
            slots, p = slots[ok], p[ok]
        self.prio[slots] = p
        self.sampler.update(slots, p)
        self.remover.update(slots, p)
        if len(p):
            self.max_priority = max(self.max_priority, float(p.max()))
        self.updates_applied += len(slots)
        self.updates_dropped += len(ok) - len(slots)
        return len(slots)

    # -- reads ----------------------------------------------------------------------------

    def sample(self, batch: int, rng: np.random.Generator) -> Sampled:
        """Draw `batch` items with replacement (fewer when max_times_sampled empties the table)."""
        slots, gens, probs, total, smallest = self.draw(batch, rng)
        return Sampled(self.gather(slots), slots, gens, probs, total, smallest)

    def draw(
        self, batch: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, float]:
        """(slots, gens, probs, total, min_weight) of `batch` draws, without gathering the columns.

        The columns of the drawn slots are still there for `gather` right after: a removed
        item's slot and frames are not rewritten before the next insert.
        """
        if self.size == 0:
            raise ValueError("cannot sample an empty table")
        total, smallest = self.weights()
        if self.is_queue:  # the oldest items, each removed: one vectorized pop
            slots = self.sampler.pop(min(batch, self.size), rng)
            gens = self.gen.take(slots)  # before the removal bumps them
            self._forget(slots, remover_done=False, free=True)
            return slots, gens, np.ones(len(slots)), total, smallest
        if self.max_times_sampled == 0:
            slots, probs = self.sampler.sample(batch, rng)
            # np.add.at would count a slot drawn twice in one batch twice, at a tenth of the
            # sample's cost; only max_times_sampled needs exact counts, and it draws singly.
            self.times[slots] += 1
            return slots, self.gen.take(slots), probs, total, smallest
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
        return slots, np.asarray(got_g, np.int64), probs, total, smallest

    def gather(self, slots: np.ndarray, out: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """The stored columns of `slots` (pixel tables: rebuilt obs/next_obs stacks).

        `out` (name -> array of the right shape and dtype, e.g. views into one reply
        buffer, see `item_layout`) receives the rows in place instead of new arrays.
        """
        if out is None:
            # ndarray.take gathers rows in about half the time of fancy indexing.
            arrays = {k: c.take(slots, axis=0) for k, c in self.columns.items()}
            for k, stacks in self.stacked.items():
                arrays[k] = self.frames.gather(stacks.take(slots, axis=0))
            return arrays
        # mode="clip": the slots are valid, and take with out= buffers in the default mode.
        # A column `out` leaves out is skipped (the server's item address replaces it).
        for k, c in self.columns.items():
            if k in out:
                c.take(slots, axis=0, out=out[k], mode="clip")
        for k, stacks in self.stacked.items():
            if k in out:
                self.frames.gather(stacks.take(slots, axis=0), out=out[k])
        return out

    def gather_frames(self, slots: np.ndarray, out: dict[str, np.ndarray], frames: np.ndarray) -> int:
        """Pixel tables: the frames of the obs and next_obs stacks of `slots` into `frames`
        (room for every frame of those stacks), and each item's stacks as indexes into them,
        into `out[<name>_frame_index]`; returns how many frames went in (the two layouts:
        replay/frameindex.py)."""
        obs, nxt = (self.stacked[k].take(slots, axis=0) for k in STACKED)
        obs_index, next_index = (out[k + INDEX] for k in STACKED)
        return frameindex.gather(self.frames, obs, nxt, obs_index, next_index, frames)

    @property
    def frames_per_item(self) -> int:
        """Frames a pixel item's stacks name, repeats counted (room a unique-frame reply needs)."""
        return len(self.stacked) * self.frame_stack

    def item_layout(self, unique_frames: bool = False) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
        """(name, dtype, shape of one item) of each column `gather` returns; with
        `unique_frames`, pixel tables give the stacks' frame indexes (see
        `gather_frames`) instead of the stacks."""
        cols = [(k, c.dtype, c.shape[1:]) for k, c in self.columns.items()]
        if self.frames is not None and unique_frames:
            cols += [(k + INDEX, np.dtype(np.int32), (self.frame_stack,)) for k in self.stacked]
        elif self.frames is not None:
            shape = (self.frame_stack, *self.frames.frame_shape)
            cols += [(k, np.dtype(np.uint8), shape) for k in self.stacked]
        return cols

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
        if self.frames is not None:
            out.update(frames_alive=self.frames.alive, frames_bytes=self.frames.nbytes)
        if self.size:
            out["bytes_per_item"] = round(self.nbytes / self.size, 1)
            out["age_mean_items"] = round(self.inserted - 1 - self.seq_sum / self.size, 1)
            total, smallest = self.weights()
            out["priority_total"] = total
            out["priority_max"] = self.max_priority
            out["priority_min"] = smallest ** (1 / self.alpha) if self.sampler_kind == "prioritized" else 1.0
        return out

    # -- snapshots ------------------------------------------------------------------------

    def settings(self) -> dict:
        """What the table was built with: a snapshot loads only into a table built the same way."""
        return {
            "name": self.name,
            "sampler": self.sampler_kind,
            "remover": self.remover_kind,
            "max_times_sampled": self.max_times_sampled,
            "capacity": self.requested_capacity,
            "priority_exponent": self.alpha,
            "max_bytes": self.max_bytes,
            "frame_stack": self.frame_stack,
            "frame_window": self.frame_window,
        }

    def export(self) -> tuple[dict, dict[str, np.ndarray]]:
        """(metadata, arrays) holding the whole table; `load` restores it into a fresh table."""
        meta: dict = {"settings": self.settings(), "allocated": self.allocated}
        if not self.allocated:
            return meta, {}
        meta.update({k: getattr(self, k) for k in ("capacity", "max_priority", *_COUNTS)})
        arrays = {f"col.{k}": c for k, c in self.columns.items()}
        arrays.update({f"stacked.{k}": c for k, c in self.stacked.items()})
        arrays.update(
            gen=self.gen, seq=self.seq, times=self.times, prio=self.prio, free=self.free[: self.nfree]
        )
        if self.frames is not None:
            meta["frames"], frame_arrays = self.frames.export()
            arrays.update({f"frames.{k}": a for k, a in frame_arrays.items()})
        return meta, arrays

    def load(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        """Fill this fresh table from `export`'s output; ValueError when its settings differ."""
        if meta["settings"] != self.settings():
            raise ValueError(f"snapshot table settings {meta['settings']} differ from {self.settings()}")
        if self.allocated:
            raise ValueError("load needs a table that has taken no insert yet")
        if not meta["allocated"]:
            return
        cap = int(meta["capacity"])
        columns = {k[4:]: a for k, a in arrays.items() if k.startswith("col.")}
        pixel = "frames" in meta
        shape = tuple(meta["frames"]["frame_shape"]) if pixel else ()
        self._allocate(columns, {FRAME: np.zeros((1, *shape), np.uint8)} if pixel else {})
        if pixel:  # the restored ring replaces the empty one _allocate made
            frame_arrays = {k[7:]: a for k, a in arrays.items() if k.startswith("frames.")}
            self.frames = FrameStore.restore(meta["frames"], frame_arrays)
        if self.capacity != cap:
            raise ValueError(f"snapshot capacity {cap} differs from the table's {self.capacity}")
        for k, a in columns.items():
            self.columns[k][:] = a
        for k in STACKED if self.frames is not None else ():
            self.stacked[k][:] = arrays[f"stacked.{k}"]
        for k in ("gen", "seq", "times", "prio"):
            getattr(self, k)[:] = arrays[k]
        for k in _COUNTS:
            setattr(self, k, int(meta[k]))
        self.max_priority = float(meta["max_priority"])
        self.free[: self.nfree] = arrays["free"]
        live = np.flatnonzero(self.seq >= 0)
        live = live[np.argsort(self.seq[live], kind="stable")]  # selectors see inserts in order
        self.seq_sum = int(self.seq[live].sum())
        self.sampler.insert(live, self.seq[live], self.prio[live])
        self.remover.insert(live, self.seq[live], self.prio[live])
