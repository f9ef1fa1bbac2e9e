"""The background checkpoint writer: the training loop hands it a snapshot and moves on.

Data flow: training thread -> `Capturer.capture` (a copy to host memory that runs on a
thread of its own, fenced by the next optimizer step; see state.py) ->
`Writer.submit` -> writer thread -> `CheckpointStore.write` (chunks to R shards,
rate-limited, then the fenced commit) -> an event in the stream.

One checkpoint is in flight at a time. A checkpoint that comes due while the previous
is still being written is not queued behind it (that would stall the training thread on
a slow shard, or build a backlog): `submit` refuses it, and the learner keeps it due and
captures the then-newest state as soon as the writer is free, coalescing every due
checkpoint in between into one. The learner reports that in the events stream.

Self-healing: the writer thread looks at every shard's Redis run id (`store.run_ids`)
right after each commit and, between checkpoints, every `repair_every_s`. When a shard
died, or restarted (a new run id: it may have come back without its data), it runs
`store.repair`, so every retained checkpoint has R valid copies on live shards again even
when no checkpoint is being written, and reports `checkpoint_repair` with its trigger
(`commit` or `timer`). Checks and repairs run on the writer thread, so they never race a
write; nothing is repaired twice for the same change.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from canopy.errors import CanopyError
from canopy.learner.checkpoint.state import Snapshot
from canopy.learner.checkpoint.store import CheckpointFenced, CheckpointStore, CommitResult


class Writer:
    """Example:
    writer = Writer(store, 0, tel.event, on_fenced=stop.set, token=lease.token, repair_every_s=5)
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
        token: str = "",
        repair_every_s: float = 0.0,
    ):
        self.store, self.learner, self.event, self.on_fenced = store, learner, event, on_fenced
        self.guard = guard  # e.g. Lease.check: refuses a commit once the lease's local deadline passed
        if repair_every_s > 0 and not token:
            raise ValueError("a timer-driven repair needs the lease token to commit repaired manifests")
        self.token = token  # the lease token timer-driven repairs commit with; jobs carry their own
        self.repair_every_s = repair_every_s  # 0: check the shards only after a commit
        self.repairs = 0
        self._seen: list[str | None] | None = None  # run id per shard the last repair covered
        self._repairing = False
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
        """Whether a checkpoint is queued or being written (`submit` would refuse one)."""
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
        """Wait until nothing is queued, written or repaired; False when `timeout` came first."""
        with self._cv:
            return self._cv.wait_for(
                lambda: self._job is None and self.in_flight is None and not self._repairing, timeout
            )

    def close(self, timeout: float = 30.0) -> None:
        """Finish the checkpoint in flight (up to `timeout`), then stop the thread."""
        self.wait_idle(timeout)
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=1.0)

    def _run(self) -> None:
        period = self.repair_every_s if self.repair_every_s > 0 else None
        next_check = time.monotonic() + (period or 0.0)
        while True:
            with self._cv:
                wait = None if period is None else max(0.0, next_check - time.monotonic())
                self._cv.wait_for(lambda: self._job is not None or self._closed, wait)
                if self._job is None and self._closed:
                    return
                if self._job is None:
                    self._repairing = True
                else:
                    snap, ckpt, token, fields = self._job
                    self._job, self.in_flight = None, snap
            if self._repairing:
                self._timer_check()
                next_check = time.monotonic() + (period or 0.0)
                continue
            try:
                snap.wait_copied()  # a background capture may still be filling the buffer
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
                self._check_shards("commit", ckpt, token)
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

    def _timer_check(self) -> None:
        try:
            self._check_shards("timer", "", self.token)
        except CheckpointFenced as exc:
            self.failures += 1
            self.event("fence", what="checkpoint", ckpt="", message=str(exc))
            if self.on_fenced is not None:
                self.on_fenced()
        except (redis.RedisError, CanopyError, OSError) as exc:
            self.event(
                "checkpoint_repair_failed", trigger="timer", error=f"{type(exc).__name__}: {exc}"[:300]
            )
        finally:
            with self._cv:
                self._repairing = False
                self._cv.notify_all()

    def _check_shards(self, trigger: str, ckpt: str, token: str) -> None:
        """Re-replicate retained checkpoints when a shard died or restarted since the last repair.

        Only on a change: repair reads back every retained replica, far too costly to
        repeat while a shard stays down. A dead shard that comes back needs nothing more
        (repaired manifests no longer point at it); one restarted between two checks is
        repaired, since it may have lost the chunks its manifests still name.
        """
        ids = self.store.run_ids()
        seen = self._seen if self._seen is not None else ids
        dead = [i for i, rid in enumerate(ids) if rid is None]
        newly_dead = [i for i in dead if self._seen is None or seen[i] is not None]
        restarted = [i for i, rid in enumerate(ids) if rid is not None and seen[i] not in (None, rid)]
        if not newly_dead and not restarted:
            self._seen = ids
            return
        t0 = time.monotonic()
        try:
            copies = self.store.repair(token, guard=self.guard)
        except CheckpointFenced:
            raise  # the caller reports the fence and stops the learner
        except (redis.RedisError, CanopyError, OSError) as exc:
            # Not remembered as repaired: the next check tries again.
            self.event(
                "checkpoint_repair_failed",
                trigger=trigger,
                ckpt=ckpt,
                error=f"{type(exc).__name__}: {exc}"[:300],
            )
            return
        self._seen = ids
        self.repairs += 1
        self.event(
            "checkpoint_repair",
            trigger=trigger,
            ckpt=ckpt or "-",
            dead_shards=",".join(map(str, dead)),
            restarted_shards=",".join(map(str, restarted)),
            copies=copies,
            seconds=round(time.monotonic() - t0, 3),
        )
