"""A shard's tables: each with its rate limiter and its parked requests.

Place in the data flow: replay/server.py builds one `Slot` per table of the [replay]
config (`build`) and routes every request to one by name; a snapshot (replay/snapshot.py)
holds what `export` returns, and a restarting shard gets fresh slots from it (`load`).

Queue tables (`Table.is_queue`, e.g. `replay.extra_tables = ["unrolls:fifo:fifo:1:64"]`)
carry on-policy unrolls, each to be trained on exactly once. They are limited by their
capacity alone, as Reverb's queue is: an insert waits (parked) until the chunk fits
beside the unread items, a sample until the queue holds the whole batch. The global
samples_per_insert / min_size / error_buffer are tuned for the off-policy main table and
would hold an on-policy learner back for nothing (or for ever: min_size above the queue's
capacity), so a queue's limiter is `QUEUE_LIMITER`, in `build`, `load` and for good: the
`configure` op leaves queues alone (replay/server.py).

Priority updates are fenced by the sender's lease epoch (`EpochFence`, one per shard: one
lease covers every table): a learner that lost its lease (paused, partitioned, replaced by a
standby) cannot reorder what its successor samples. The ranks of a learner group share
their epoch, so all of them pass. The newest epoch goes into every snapshot (`export`
state key `priority_epoch`, read back by `fence_from`), so a restarted shard still refuses
a stale learner that comes back; a shard without snapshots starts again at 0 and learns the
newest epoch from the first update of the live learner.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from canopy import wire
from canopy.config import ReplayConfig
from canopy.errors import ProtocolError
from canopy.replay.limiter import RateLimiter
from canopy.replay.packed import Layouts
from canopy.replay.protocol import MAIN, MAX_EPOCH, SampleRequest
from canopy.replay.snapshot import Groups
from canopy.replay.table import Table

QUEUE_LIMITER = {"samples_per_insert": 0.0, "min_size": 1, "error_buffer": 0.0}  # no ratio, no warm-up


@dataclass
class Parked:
    """A request the rate limiter holds back; samples give up at `deadline`."""

    ident: bytes
    msg: wire.Message
    deadline: float
    sample: SampleRequest | None = None  # samples: the request, checked when it came
    n: int = 0  # inserts: the chunk's item count, checked when it came


@dataclass
class Slot:
    """A table with its limiter and its own parked queues (one table never blocks another)."""

    table: Table
    limiter: RateLimiter
    inserts: deque[Parked] = field(default_factory=deque)
    samples: deque[Parked] = field(default_factory=deque)
    layouts: Layouts = field(default_factory=Layouts)  # packed sample replies, by batch length

    def admits(self, n: int) -> bool:
        """Whether an insert of `n` items may go ahead now (a queue: only if it evicts nothing)."""
        return self.limiter.can_insert() and self.table.room(n)

    def serves(self, batch: int) -> bool:
        """Whether a sample of `batch` items may be served now (a queue: only a whole batch)."""
        size = self.table.size
        if self.table.is_queue and size < batch:
            return False
        return size > 0 and self.limiter.can_sample(size, batch)

    def check_batch(self, batch: int) -> None:
        """ProtocolError for a batch a queue could never serve: more items than it holds."""
        cap = self.table.capacity
        if self.table.is_queue and batch > cap:
            raise ProtocolError(
                f"queue table {self.table.name!r} holds {cap} items, a batch of {batch} could never "
                "be served: ask for smaller batches or raise the capacity in its replay.extra_tables entry"
            )

    def most_batches(self, want: SampleRequest) -> int:
        """How many of the batches asked for may be drawn at once: several only where draws
        remove nothing (each still `batch` independent draws, as if asked one by one) or
        from a queue holding them all (each the next `batch` items, exactly)."""
        if self.table.max_times_sampled == 0:
            return want.batches
        if self.table.is_queue:
            return max(1, min(want.batches, self.table.size // want.batch))
        return 1


@dataclass
class EpochFence:
    """The newest learner lease epoch seen in a priority update; older ones are refused.

    Example:
        fence = EpochFence()
        fence.admit(2)  # True: epoch 2 is now the newest
        fence.admit(1)  # False: a fenced learner's update
    """

    newest: int = 0

    def admit(self, epoch: int) -> bool:
        """Whether an update from `epoch` may apply; a newer epoch becomes the newest."""
        if epoch < self.newest:
            return False
        self.newest = epoch
        return True


def fence_from(state: Any) -> EpochFence:
    """The fence a snapshot's state holds (0 for a snapshot taken before fencing existed);
    ValueError when its `priority_epoch` is not an epoch."""
    epoch = state.get("priority_epoch", 0) if isinstance(state, dict) else None
    if type(epoch) is not int or not 0 <= epoch <= MAX_EPOCH:
        raise ValueError(f"its priority_epoch {epoch!r} is not an integer in 0..{MAX_EPOCH}")
    return EpochFence(epoch)


def table_specs(cfg: ReplayConfig) -> list[dict[str, Any]]:
    """The main table from the [replay] keys, then each `extra_tables` entry.

    An extra entry reads `name:sampler:remover[:max_times_sampled[:capacity]]`, e.g.
    `queue:fifo:fifo:1:10000` (a queue: each item is sampled once, oldest first).
    """
    specs = [
        dict(
            name=MAIN,
            sampler=cfg.sampler,
            remover=cfg.remover,
            max_times_sampled=cfg.max_times_sampled,
            capacity=cfg.capacity,
        )
    ]
    for entry in cfg.extra_tables:
        parts = entry.split(":")
        if not 3 <= len(parts) <= 5 or not parts[0] or parts[0] == MAIN:
            raise ValueError(
                f"replay.extra_tables entry {entry!r} must read name:sampler:remover"
                "[:max_times_sampled[:capacity]] with a name other than 'main'"
            )
        specs.append(
            dict(
                name=parts[0],
                sampler=parts[1],
                remover=parts[2],
                max_times_sampled=int(parts[3]) if len(parts) > 3 else 0,
                capacity=int(parts[4]) if len(parts) > 4 else cfg.capacity,
            )
        )
    return specs


def build(cfg: ReplayConfig, seed: int) -> dict[str, Slot]:
    """Empty tables with fresh limiters, by name, MAIN first."""
    slots: dict[str, Slot] = {}
    specs = table_specs(cfg)
    for i, spec in enumerate(specs):
        table = Table(
            spec["capacity"],
            sampler=spec["sampler"],
            remover=spec["remover"],
            max_times_sampled=spec["max_times_sampled"],
            priority_exponent=cfg.priority_exponent,
            max_bytes=int(cfg.capacity_mb * 2**20 / len(specs)),  # the shard's budget, split
            name=spec["name"],
            seed=seed * 7919 + i,
            frame_stack=cfg.frame_stack,
            frame_window=cfg.frame_window,
        )
        if table.is_queue:
            limiter = RateLimiter(**QUEUE_LIMITER)
        else:
            limiter = RateLimiter(cfg.samples_per_insert, cfg.min_size, cfg.error_buffer)
        slots[spec["name"]] = Slot(table, limiter)
    return slots


def export(slots: dict[str, Slot], fence: EpochFence | None = None) -> tuple[dict[str, Any], Groups]:
    """Every table and limiter, and the newest priority epoch, as (JSON state, arrays per
    table): what a snapshot holds."""
    state: dict[str, Any] = {"tables": {}, "limiters": {}, "priority_epoch": fence.newest if fence else 0}
    groups: Groups = {}
    for name, slot in slots.items():
        state["tables"][name], groups[name] = slot.table.export()
        lim = slot.limiter
        state["limiters"][name] = {**lim.settings(), "inserted": lim.inserted, "sampled": lim.sampled}
    return state, groups


def load(cfg: ReplayConfig, seed: int, state: Any, groups: Groups) -> dict[str, Slot]:
    """Fresh slots holding a snapshot's state; ValueError when it does not fit this config."""
    if not isinstance(state, dict) or not isinstance(state.get("tables"), dict):
        raise ValueError("its state is not a map of tables")
    names = {spec["name"] for spec in table_specs(cfg)}
    if set(state["tables"]) != names:
        raise ValueError(f"it holds tables {sorted(state['tables'])}, this shard has {sorted(names)}")
    fresh = build(cfg, seed)
    try:
        for name, slot in fresh.items():
            slot.table.load(state["tables"][name], groups.get(name, {}))
            lim = state["limiters"][name]
            if not slot.table.is_queue:  # a queue keeps QUEUE_LIMITER, whatever an older shard saved
                slot.limiter = RateLimiter(
                    float(lim["samples_per_insert"]), int(lim["min_size"]), float(lim["error_buffer"])
                )
            slot.limiter.inserted, slot.limiter.sampled = int(lim["inserted"]), int(lim["sampled"])
    except (KeyError, TypeError, IndexError, AttributeError) as exc:
        raise ValueError(f"its state does not fit this shard ({type(exc).__name__}: {exc})") from None
    return fresh
