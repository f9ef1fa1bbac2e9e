"""A shard's tables: each with its rate limiter and its parked requests.

Place in the data flow: replay/server.py builds one `Slot` per table of the [replay]
config (`build`) and routes every request to one by name; a snapshot (replay/snapshot.py)
holds what `export` returns, and a restarting shard gets fresh slots from it (`load`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from canopy import wire
from canopy.config import ReplayConfig
from canopy.replay.limiter import RateLimiter
from canopy.replay.packed import Layouts
from canopy.replay.protocol import MAIN, SampleRequest
from canopy.replay.snapshot import Groups
from canopy.replay.table import Table


@dataclass
class Parked:
    """A request the rate limiter holds back; samples give up at `deadline`."""

    ident: bytes
    msg: wire.Message
    deadline: float
    sample: SampleRequest | None = None  # samples: the request, checked when it came


@dataclass
class Slot:
    """A table with its limiter and its own parked queues (one table never blocks another)."""

    table: Table
    limiter: RateLimiter
    inserts: deque[Parked] = field(default_factory=deque)
    samples: deque[Parked] = field(default_factory=deque)
    layouts: Layouts = field(default_factory=Layouts)  # packed sample replies, by batch length


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
        limiter = RateLimiter(cfg.samples_per_insert, cfg.min_size, cfg.error_buffer)
        slots[spec["name"]] = Slot(table, limiter)
    return slots


def export(slots: dict[str, Slot]) -> tuple[dict[str, Any], Groups]:
    """Every table and limiter as (JSON state, arrays per table): what a snapshot holds."""
    state: dict[str, Any] = {"tables": {}, "limiters": {}}
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
            slot.limiter = RateLimiter(
                float(lim["samples_per_insert"]), int(lim["min_size"]), float(lim["error_buffer"])
            )
            slot.limiter.inserted, slot.limiter.sampled = int(lim["inserted"]), int(lim["sampled"])
    except (KeyError, TypeError, IndexError, AttributeError) as exc:
        raise ValueError(f"its state does not fit this shard ({type(exc).__name__}: {exc})") from None
    return fresh
