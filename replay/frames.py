"""Frame store of a pixel table: each observation frame kept once, stacks rebuilt on sampling.

Place in the data flow: an actor's FrameAdder (actors/adder.py) sends every new frame once,
in the `frame`, `frame_key`, `frame_prev` columns of an insert, and names a transition's
obs and next_obs by the key of their newest frame. replay/table.py hands those columns to
this store, keeps per item the slots of the `stack` frames of obs and of next_obs, and
gathers them here at sample time: a 4x84x84 uint8 transition costs one 84x84 frame plus a
few dozen bytes instead of two stacked observations.

Stacking convention (gymnasium 1.x FrameStackObservation, padding_type="reset", the
AtariPreprocessing + frame-stack setup): a frame whose `frame_prev` is its own key starts
an episode, and the stack before it is padded by repeating it. A stack never reaches
across that frame, so no frame of one episode shows up in another's observation.

Lifetime: a frame is freed when its reference count drops to zero. References are held by
- every stored item, once per entry of its obs stack and of its next_obs stack, and
- the pin window: the newest `window` frames that arrived are pinned (each pin holds its
  whole stack, so older frames an incoming stack still needs stay alive), and only pinned
  frames can be named by an insert. A key older than the window is refused.
So an item that survives eviction keeps exactly the frames it shows, however far the
ring's allocation has moved on, and an episode's old frames go with its last item.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from canopy.errors import ProtocolError

FRAME, FRAME_KEY, FRAME_PREV = "frame", "frame_key", "frame_prev"
COLUMNS = (FRAME, FRAME_KEY, FRAME_PREV)
STACKED = ("obs", "next_obs")  # transition columns that carry frame keys on a pixel insert


def split(arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(frame columns, the rest) of an insert."""
    frames = {k: a for k, a in arrays.items() if k in COLUMNS}
    return frames, {k: a for k, a in arrays.items() if k not in COLUMNS}


def check_columns(frames: dict[str, np.ndarray], rest: dict[str, np.ndarray]) -> None:
    """Schema of a pixel insert; ProtocolError names the first problem."""
    if set(frames) != set(COLUMNS):
        raise ProtocolError(f"a pixel insert needs all of {', '.join(COLUMNS)}; got {', '.join(frames)}")
    f, keys, prevs = frames[FRAME], frames[FRAME_KEY], frames[FRAME_PREV]
    if f.ndim < 2 or f.dtype != np.uint8:
        raise ProtocolError(f"'frame' must be uint8 [frames, ...], got {f.dtype} {list(f.shape)}")
    for name, a in ((FRAME_KEY, keys), (FRAME_PREV, prevs)):
        if a.dtype != np.int64 or a.shape != (len(f),):
            raise ProtocolError(f"'{name}' must be int64 [{len(f)}], got {a.dtype} {list(a.shape)}")
    if len(np.unique(keys)) != len(keys):
        raise ProtocolError("frame keys within one insert must be unique")
    for name in STACKED:
        a = rest.get(name)
        if a is None or a.dtype != np.int64 or a.ndim != 1:
            raise ProtocolError(f"a pixel insert names '{name}' by int64 frame keys, one per item")


def check_refs(
    frames: dict[str, np.ndarray], rest: dict[str, np.ndarray], pinned: dict[int, int], window: int
) -> None:
    """Each key an insert names is a frame of the insert itself (earlier in it, for a
    `frame_prev`) or one of the `pinned` frames the shard holds."""
    known = set(frames[FRAME_KEY].tolist())
    seen: set[int] = set()
    for key, prev in zip(frames[FRAME_KEY].tolist(), frames[FRAME_PREV].tolist(), strict=True):
        if prev != key and prev not in seen and prev not in pinned:
            raise ProtocolError(f"frame {key} follows frame {prev}, which this shard does not hold")
        seen.add(key)
    for name in STACKED:
        missing = [k for k in rest[name].tolist() if k not in known and k not in pinned]
        if missing:
            raise ProtocolError(
                f"'{name}' names frame {missing[0]}, which was never sent or is older than "
                f"the last {window} frames (replay.frame_window)"
            )


class FrameStore:
    """Example:
    store = FrameStore(capacity=1000, frame_shape=(84, 84), stack=4, window=256)
    store.add(np.array([7, 8]), np.array([7, 7]), frames)  # 7 starts an episode, 8 follows
    stacks = store.stacks(np.array([8]))  # [[s7, s7, s7, s8]]
    store.acquire(stacks)
    obs = store.gather(stacks)  # uint8 [1, 4, 84, 84]
    """

    def __init__(self, capacity: int, frame_shape: tuple[int, ...], stack: int, window: int):
        self.capacity, self.frame_shape, self.stack, self.window = capacity, frame_shape, stack, window
        # np.zeros maps untouched pages lazily: the ring's spare room costs no RSS until used.
        self.data = np.zeros((capacity, *frame_shape), np.uint8)
        self.stacks_of = np.zeros((capacity, stack), np.int32)  # each frame's own stack, oldest first
        self.refs = np.zeros(capacity, np.int32)
        self.keys = np.zeros(capacity, np.int64)
        self.free = np.arange(capacity - 1, -1, -1, dtype=np.int64)  # a stack: pops 0, 1, 2, ...
        self.nfree = capacity
        self.index: dict[int, int] = {}  # key -> slot, for pinned frames only
        self.pinned: deque[int] = deque()  # slots in arrival order
        self.added_total = 0

    @property
    def alive(self) -> int:
        """Frames held now, by items or pins."""
        return self.capacity - self.nfree

    @property
    def frame_bytes(self) -> int:
        """Bytes of one frame."""
        return int(np.prod(self.frame_shape))

    @property
    def nbytes(self) -> int:
        """Bytes of the frames alive and their bookkeeping (the spare ring is not resident)."""
        per_frame = self.frame_bytes + 4 * self.stack + 4 + 8 + 8
        return self.alive * per_frame + len(self.index) * 100  # a dict entry is about 100 bytes

    def check(self, frames: dict[str, np.ndarray], rest: dict[str, np.ndarray]) -> None:
        """Every key the insert names is in it or pinned here; the frame shape matches."""
        check_columns(frames, rest)
        if frames[FRAME].shape[1:] != self.frame_shape:
            raise ProtocolError(
                f"frame shape {list(frames[FRAME].shape[1:])} differs from table {list(self.frame_shape)}"
            )
        check_refs(frames, rest, self.index, self.window)

    def add(self, keys: np.ndarray, prevs: np.ndarray, frames: np.ndarray) -> None:
        """Store new frames (the caller made room: `nfree >= len(keys)`) and pin them."""
        n = len(keys)
        slots = self.free[self.nfree - n : self.nfree][::-1].copy()
        self.nfree -= n
        self.data[slots] = frames
        self.keys[slots] = keys
        for slot, key, prev in zip(slots.tolist(), keys.tolist(), prevs.tolist(), strict=True):
            if prev == key:  # an episode starts: pad by repeating this frame
                self.stacks_of[slot] = slot
            else:
                p = self.index[prev]
                self.stacks_of[slot, :-1] = self.stacks_of[p, 1:]
                self.stacks_of[slot, -1] = slot
            self.index[key] = slot  # a repeated key (a restarted actor) now names this frame
            self.pinned.append(slot)
        np.add.at(self.refs, self.stacks_of[slots], 1)
        self.added_total += n

    def unpin_overflow(self) -> None:
        """Drop the pins of frames older than the window (after the insert that needed them)."""
        while len(self.pinned) > self.window:
            slot = self.pinned.popleft()
            if self.index.get(int(self.keys[slot])) == slot:
                del self.index[int(self.keys[slot])]
            self.release(self.stacks_of[slot])

    def stacks(self, keys: np.ndarray) -> np.ndarray:
        """[n, stack] frame slots of the observations whose newest frames have these keys."""
        slots = np.fromiter((self.index[k] for k in keys.tolist()), np.int64, len(keys))
        return self.stacks_of[slots]

    def acquire(self, stacks: np.ndarray) -> None:
        """One more reference to every frame of `stacks` (an item now names them)."""
        np.add.at(self.refs, stacks.ravel(), 1)

    def release(self, stacks: np.ndarray) -> None:
        """One reference less per frame of `stacks`; frames no longer named go back to the ring."""
        flat = stacks.ravel()
        np.subtract.at(self.refs, flat, 1)
        touched = np.unique(flat)
        dead = touched[self.refs[touched] == 0]
        self.free[self.nfree : self.nfree + len(dead)] = dead
        self.nfree += len(dead)

    def gather(self, stacks: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """uint8 [n, stack, *frame_shape] frames of `stacks` (into `out` when given)."""
        if out is None:
            return self.data.take(stacks, axis=0)
        return self.data.take(stacks, axis=0, out=out, mode="clip")

    # -- snapshots --------------------------------------------------------------------------

    def export(self) -> tuple[dict, dict[str, np.ndarray]]:
        """(metadata, arrays) that `restore` turns back into this store."""
        high = int(np.flatnonzero(self.refs).max(initial=-1)) + 1  # live frames sit below this
        meta = {"capacity": self.capacity, "frame_shape": list(self.frame_shape), "stack": self.stack}
        meta.update(window=self.window, high=high, nfree=self.nfree, added_total=self.added_total)
        index_keys = np.fromiter(self.index.keys(), np.int64, len(self.index))
        arrays = {
            "data": self.data[:high],
            "stacks_of": self.stacks_of[:high],
            "refs": self.refs[:high],
            "keys": self.keys[:high],
            "free": self.free[: self.nfree],
            "index_keys": index_keys,
            "index_slots": np.fromiter(self.index.values(), np.int64, len(self.index)),
            "pinned": np.fromiter(self.pinned, np.int64, len(self.pinned)),
        }
        return meta, arrays

    @classmethod
    def restore(cls, meta: dict, arrays: dict[str, np.ndarray]) -> FrameStore:
        """A store rebuilt from `export`'s (metadata, arrays)."""
        store = cls(
            int(meta["capacity"]), tuple(meta["frame_shape"]), int(meta["stack"]), int(meta["window"])
        )
        high = int(meta["high"])
        for name in ("data", "stacks_of", "refs", "keys"):
            getattr(store, name)[:high] = arrays[name]
        store.nfree = int(meta["nfree"])
        store.free[: store.nfree] = arrays["free"]
        store.index = dict(zip(arrays["index_keys"].tolist(), arrays["index_slots"].tolist(), strict=True))
        store.pinned = deque(arrays["pinned"].tolist())
        store.added_total = int(meta["added_total"])
        return store
