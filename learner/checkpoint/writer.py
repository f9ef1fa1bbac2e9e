"""The background checkpoint writer: the training loop hands it a snapshot and moves on.

Data flow: training thread -> `Capturer.capture` (copy to host memory, milliseconds) ->
`Writer.submit` -> writer thread -> `CheckpointStore.write` (chunks to R shards,
rate-limited, then the fenced commit) -> an event in the stream.

One checkpoint is in flight at a time. A checkpoint that comes due while the previous
is still being written is not queued behind it (that would stall the training thread on
a slow shard, or build a backlog): `submit` refuses it, and the learner keeps it due and
captures the then-newest state as soon as the writer is free, coalescing every due
checkpoint in between into one. The learner reports that in the events stream.

Self-healing: when a write finds a shard that no longer answers (`store.last_dead`
changed), the writer thread runs `store.repair` right after that commit, so every retained
checkpoint has R copies on live shards again, and reports `checkpoint_repair`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from cluster.errors import CanopyError
from learner.checkpoint.state import Snapshot
from learner.checkpoint.store import CheckpointFenced, CheckpointStore, CommitResult


class Writer:
    """Example:
    writer = Writer(store, learner=0, event=tel.event, on_fenced=stop.set)
    if not writer.busy():
        writer.submit(capturer.capture(algo, counters, cfg_dict), ckpt="7.500", token=lease.token)
    """

    def __init__(
        self,
        store: CheckpointStore,
        learner: int,
        event: Callable[..., None],
        on_fenced: Callable[[], None] | None = None,
        guard: Callable[[], None] | None = None,
    ):
        self.store, self.learner, self.event, self.on_fenced = store, learner, event, on_fenced
        self.guard = guard  # e.g. Lease.check: refuses a commit once the lease's local deadline passed
        self.repairs = 0
        self._repaired_dead: list[int] = []  # the dead shards the last repair already covered
        self.last: CommitResult | None = None
        self.last_committed = ""  # id of the newest checkpoint this learner committed
        self.commits = 0
        self.failures = 0
        self.in_flight: Snapshot | None = None
        self._job: tuple[Snapshot, str, str, dict[str, Any]] | None = None
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="ckpt-writer", daemon=True)
        self._thread.start()

    def busy(self) -> bool:
        with self._cv:
            return self._job is not None or self.in_flight is not None

    def submit(self, snap: Snapshot, ckpt: str, token: str, **fields: Any) -> bool:
        """Queue a snapshot for writing; False (nothing queued) while another is in flight."""
        with self._cv:
            if self._job is not None or self.in_flight is not None or self._closed:
                return False
            self._job = (snap, ckpt, token, fields)
            self._cv.notify()
            return True

    def wait_idle(self, timeout: float) -> bool:
        with self._cv:
            return self._cv.wait_for(lambda: self._job is None and self.in_flight is None, timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Finish the checkpoint in flight (up to `timeout`), then stop the thread."""
        self.wait_idle(timeout)
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=1.0)

    def _run(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._job is not None or self._closed)
                if self._job is None:
                    return
                snap, ckpt, token, fields = self._job
                self._job, self.in_flight = None, snap
            try:
                result = self.store.write(snap, ckpt, token, self.learner, guard=self.guard)
                self.last, self.last_committed = result, ckpt
                self.commits += 1
                self.event(
                    "checkpoint_commit",
                    ckpt=ckpt,
                    bytes=result.nbytes,
                    chunks=result.chunks,
                    write_s=round(result.write_s, 4),
                    commit_s=round(result.commit_s, 4),
                    **fields,
                )
                self._repair_if_needed(ckpt, token)
            except CheckpointFenced as exc:
                self.failures += 1
                self.event("fence", what="checkpoint", ckpt=ckpt, message=str(exc))
                if self.on_fenced is not None:
                    self.on_fenced()
            except (redis.RedisError, CanopyError, OSError) as exc:
                # A shard died mid-write: this checkpoint is torn (never visible); the next one
                # is planned again against the shards that answer.
                self.failures += 1
                self.event("checkpoint_failed", ckpt=ckpt, error=f"{type(exc).__name__}: {exc}"[:300])
            finally:
                with self._cv:
                    self.in_flight = None
                    self._cv.notify_all()

    def _repair_if_needed(self, ckpt: str, token: str) -> None:
        """Re-replicate retained checkpoints once per newly dead set of shards.

        Only on a change: repair reads back every retained replica, far too costly to
        repeat after every commit while a shard stays down. A shard that comes back empty
        needs nothing (repaired manifests no longer point at it).
        """
        dead = list(self.store.last_dead)
        if not dead or not set(dead) - set(self._repaired_dead):
            self._repaired_dead = dead
            return
        t0 = time.monotonic()
        try:
            copies = self.store.repair(token, guard=self.guard)
        except CheckpointFenced:
            raise  # _run reports the fence and stops the learner
        except (redis.RedisError, CanopyError, OSError) as exc:
            # Not remembered as repaired: the next commit tries again.
            self.event("checkpoint_repair_failed", ckpt=ckpt, error=f"{type(exc).__name__}: {exc}"[:300])
            return
        self._repaired_dead = dead
        self.repairs += 1
        self.event(
            "checkpoint_repair",
            ckpt=ckpt,
            dead_shards=",".join(map(str, dead)),
            copies=copies,
            seconds=round(time.monotonic() - t0, 3),
        )
