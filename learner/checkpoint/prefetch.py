"""A warm standby keeps the newest checkpoint loaded while it waits for the lease.

Data flow: standby learner (learner/role.py, before `Lease.acquire`) -> `Prefetcher`
thread polls `ckpt:index` and loads (reads, verifies every digest, parses) each newer
committed checkpoint -> on takeover, `take()` stops the thread and hands the loaded
checkpoint over only if it is still the newest committed one; otherwise the learner
falls back to `CheckpointStore.recover`. Committed checkpoints are immutable (ids never
repeat: `<epoch>.<step>`, commits are fenced), so bytes verified before the takeover are
the bytes of that checkpoint afterwards. What this saves: reading and verifying the whole
state after the primary died, the bulk of a warm takeover for a large state.
"""

from __future__ import annotations

import contextlib
import threading

import redis

from canopy.errors import CanopyError
from canopy.learner.checkpoint.store import CheckpointStore, Loaded


class Prefetcher:
    """Example:
    pre = Prefetcher(store, poll_s=1.0)   # starts loading in the background
    lease.acquire(timeout=None, stop=stop)
    loaded = pre.take() or store.recover()
    """

    def __init__(self, store: CheckpointStore, poll_s: float = 1.0):
        self.store, self.poll_s = store, poll_s
        self.loaded: Loaded | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ckpt-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            # Shards that fail or a torn newest checkpoint: try again next poll.
            with contextlib.suppress(redis.RedisError, CanopyError):
                ids = self.store.committed()
                if ids and (self.loaded is None or ids[0] != self.loaded.ckpt):
                    loaded = self.store.recover()
                    if loaded is not None:
                        self.loaded = loaded
            self._stop.wait(self.poll_s)

    def take(self, timeout: float = 30.0) -> Loaded | None:
        """Stop prefetching; the loaded checkpoint if it is still the newest committed, else None."""
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive() or self.loaded is None:
            return None  # still reading after `timeout`: the caller recovers itself
        try:
            ids = self.store.committed()
        except redis.RedisError:
            return None
        return self.loaded if ids and ids[0] == self.loaded.ckpt else None
