"""`canopy status`: one table of every role, read from the same Redis keys redis-cli sees.

The run comes from a run directory, a cluster TOML or a bare Redis address
(cluster/connection.py); its processes are those in the liveness sets `alive:<role>` and,
from a run directory, the ones cluster.json lists. Exits 1 when one of them has no live
stats hash or is past its deadline, so the command doubles as a health check.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import redis
from rich.console import Console
from rich.live import Live
from rich.table import Table

from canopy import config as config_mod
from canopy.cache import ledger
from canopy.cluster.connection import Target
from canopy.errors import ProtocolError, UserError
from canopy.keys import Keys
from canopy.redisconn import connect
from canopy.version import Version

COLUMNS = (
    ("state", "state"),
    ("rate/s", "rate"),
    ("env steps", "env_steps_total"),
    ("updates", "updates_total"),
    ("version", "policy_version"),
    ("lag", "lag"),
    ("return", "episode_return_mean"),
    ("eval", "eval_return"),
    ("items", "items"),
    ("rejected", "rejected_total"),
    ("rss MB", "rss_mb"),
)
# Table order; a process of another role (none today) would come last.
ROLE_ORDER = ("replay", "cache", "learner", "evaluator", "actor")
# The counter whose mean rate since the process started is each role's "rate/s".
RATE_OF = {"actor": "env_steps_total", "learner": "updates_total", "replay": "inserts_total"}
MAX_CKPT_DOC_BYTES = 4 << 20

if TYPE_CHECKING:  # torch comes with it: imported only by `canopy checkpoint list`
    from canopy.learner.checkpoint.store import CheckpointStore


def processes(r: redis.Redis, keys: Keys, listed: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """(role, id) of every process the run's liveness sets hold, plus `listed` (cluster.json),
    in role order. A process that stopped cleanly has left its set; one that died stays,
    past its deadline, until it comes back."""
    pipe = r.pipeline(transaction=False)
    for role in ROLE_ORDER:
        pipe.zrange(keys.alive(role), 0, -1)
    found = set(listed)
    for role, members in zip(ROLE_ORDER, pipe.execute(), strict=True):
        found |= {(role, int(m)) for m in members if m.isdigit() and len(m) < 10}
    order = {role: i for i, role in enumerate(ROLE_ORDER)}
    return sorted(found, key=lambda p: (order.get(p[0], len(order)), p[1]))


def read(target: Target) -> tuple[list[dict[str, Any]], bool, str]:
    """Rows (one per role process), whether every one is alive, a caption.

    The caption holds the policy lag of the actors and the age of the newest checkpoint.
    """
    with contextlib.closing(target.client("status")) as r:  # `--watch` reads once a second
        return _read(r, target)


def _read(r: redis.Redis, target: Target) -> tuple[list[dict[str, Any]], bool, str]:
    keys = target.keys
    try:
        procs = processes(r, keys, target.listed)
        pipe = r.pipeline(transaction=False)
        for role, ident in procs:
            pipe.hgetall(keys.proc(role, ident))
            pipe.zscore(keys.alive(role), str(ident))
        replies = pipe.execute()
    except redis.RedisError as exc:
        raise UserError(
            f"cannot read the run's Redis root {target.where()} ({exc}): is the run up?"
        ) from None
    if not procs:
        caption = f"no process of run {keys.run} has reported to this Redis (alive:<role> is empty)"
        return [], False, caption
    now = time.time()
    rows = [
        row(role, ident, stats, deadline, now)
        for (role, ident), stats, deadline in zip(procs, replies[::2], replies[1::2], strict=True)
    ]
    add_lag(rows, r.get(keys.model_latest), ledger.acting(r, keys))
    caption = f"{policy_lag(r, keys)}\n{checkpoint_age(r, keys, now)}"
    return rows, all(x["alive"] for x in rows), caption


def row(
    role: str, ident: int, stats: dict[bytes, bytes], deadline: float | None, now: float
) -> dict[str, Any]:
    """One process's table row from its stats hash and liveness deadline.

    Anyone who can write to Redis can write these keys: odd bytes are shown replaced, an
    unreadable heartbeat time as unknown, and neither makes the status reader fail.
    """
    fields = {k.decode(errors="replace"): v.decode(errors="replace") for k, v in stats.items()}
    alive = bool(fields) and deadline is not None and deadline >= now
    try:
        beat: float | None = now - float(fields["updated_at"])
    except (KeyError, ValueError):
        beat = None
    out: dict[str, Any] = {**fields, "role": role, "id": ident, "alive": alive, "heartbeat_age_s": beat}
    started, updated = _number(fields.get("started_at")), _number(fields.get("updated_at"))
    count = _number(fields.get(RATE_OF.get(role, "")))
    if None not in (started, updated, count) and updated > started:
        out["rate"] = f"{count / (updated - started):,.0f}"
    rss = _number(fields.get("rss_bytes"))
    if rss is not None:
        out["rss_mb"] = f"{rss / 2**20:,.0f}"
    return out


def add_lag(rows: list[dict[str, Any]], latest_raw: bytes | None, ledger: dict[bytes, bytes]) -> None:
    """Each actor's lag behind `model:latest`, in learner steps (only within one epoch).

    The version an actor acts with comes from its `ledger:actor:<id>`, written as it switches, the
    same source as the caption; its stats hash can be a heartbeat older.
    """
    try:
        latest = Version.parse(latest_raw) if latest_raw is not None else None
    except ProtocolError:
        return
    for entry in rows:
        if latest is None or entry["role"] != "actor":
            continue
        try:
            acting = Version.parse(ledger.get(str(entry["id"]).encode(), b""))
        except ProtocolError:
            continue
        entry["lag"] = str(max(0, latest.step - acting.step)) if acting.epoch == latest.epoch else "epoch"


def checkpoint_age(r: redis.Redis, keys: Keys, now: float) -> str:
    """How old the newest committed checkpoint is, from `ckpt:index` and its manifest."""
    newest = r.zrevrange(keys.ckpt_index, 0, 0)
    if not newest:
        return "checkpoint: none committed yet"
    ckpt = newest[0].decode(errors="replace")
    manifest = keys.ckpt_manifest(ckpt)
    if r.hstrlen(manifest, "doc") > MAX_CKPT_DOC_BYTES:
        return f"checkpoint {ckpt}: manifest over {MAX_CKPT_DOC_BYTES >> 20} MiB, not read"
    try:
        created = _number(json.loads(r.hget(manifest, "doc") or b"{}").get("created_at"))
    except (ValueError, AttributeError):
        created = None
    if created is None:
        return f"checkpoint {ckpt}: manifest has no creation time"
    return f"checkpoint {ckpt}: {now - created:.1f}s old, {r.zcard(keys.ckpt_index)} committed"


def _number(text: str | None) -> float | None:
    """A finite float from an untrusted field, else None."""
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def policy_lag(r: redis.Redis, keys: Keys) -> str:
    """Lag of every actor behind the newest version, from `model:latest` and the actors' ledger entries.

    Within one epoch the lag is in learner steps; an actor still on an older epoch's version
    is counted apart (steps of different epochs do not compare).
    """
    latest_raw, acting = r.get(keys.model_latest), ledger.acting(r, keys)
    if latest_raw is None or not acting:
        return "policy lag: no version published or no actor acting yet"
    try:
        latest = Version.parse(latest_raw)
    except ProtocolError:
        return f"policy lag: model:latest holds no version id ({latest_raw[:40]!r})"
    lags, older_epoch = [], 0
    for raw in acting.values():
        try:
            v = Version.parse(raw)
        except ProtocolError:
            continue
        if v.epoch == latest.epoch:
            lags.append(max(0, latest.step - v.step))
        else:
            older_epoch += 1
    text = f"policy lag behind {latest} over {len(acting)} actors (learner steps)"
    if lags:
        q = np.percentile(lags, [0, 50, 90, 100])
        text += f": min {q[0]:.0f}, p50 {q[1]:.0f}, p90 {q[2]:.0f}, max {q[3]:.0f}"
    if older_epoch:
        text += f"; {older_epoch} on an older epoch"
    return text


def render(rows: list[dict[str, Any]], caption: str = "") -> Table:
    """The status table of `rows`, with `caption` under it."""
    table = Table(title="canopy status", caption=caption or None)
    for name in ("role", "id", "alive", "beat", *(c for c, _ in COLUMNS)):
        table.add_column(name)
    for row in rows:
        beat = "-" if row["heartbeat_age_s"] is None else f"{row['heartbeat_age_s']:.1f}s"
        alive = "[green]yes[/]" if row["alive"] else "[red]DEAD[/]"
        table.add_row(row["role"], str(row["id"]), alive, beat, *(row.get(k, "") for _, k in COLUMNS))
    return table


def main(target: Target, watch: bool) -> int:
    """Print the table (refreshed every second with `watch`); 1 when a role is not alive."""
    # Piped output (probes, logs) gets a wide table instead of rich's 80-column default.
    console = Console(width=None if sys.stdout.isatty() else 200)
    rows, healthy, lag = read(target)
    if not watch:
        console.print(render(rows, lag))
        return 0 if healthy else 1
    with Live(render(rows, lag), console=console, refresh_per_second=1) as live:
        try:
            while True:
                time.sleep(1)
                rows, healthy, lag = read(target)
                live.update(render(rows, lag))
        except KeyboardInterrupt:
            pass
    return 0 if healthy else 1


def health(config_file: str, role: str, ident: int, allow_standby: bool = False) -> int:
    """Exit code for probes: 0 when `role ident` has a fresh heartbeat and is running.

    With `allow_standby`, a standby learner (warm, or cold before the first checkpoint)
    counts as healthy too (liveness), while without it only the learner holding the lease
    does (readiness).
    """
    cfg = config_mod.load(config_file)
    keys = Keys(cfg.run.name)
    r = connect(cfg.cluster, "health", 0)
    try:
        state = r.hget(keys.proc(role, ident), "state")
        deadline = r.zscore(keys.alive(role), str(ident))
    except redis.RedisError as exc:
        print(f"{role} {ident}: unhealthy (Redis root unreachable: {exc})")
        return 1
    healthy_states = (b"running", b"standby", b"cold") if allow_standby else (b"running",)
    if state not in healthy_states or deadline is None or deadline < time.time():
        shown = state.decode() if state else "no stats hash"
        print(f"{role} {ident}: unhealthy ({shown})")
        return 1
    print(f"{role} {ident}: healthy ({state.decode()})")
    return 0


def checkpoints(target: Target) -> Table:
    """`canopy checkpoint list`: the run's committed checkpoints, newest first, each from its
    first manifest copy whose digest and shape check out on any reachable shard."""
    from canopy.learner.checkpoint.placement import make_plan, shard_hosts_of
    from canopy.learner.checkpoint.store import CheckpointStore

    addresses = target.cfg.cluster.redis
    plan = make_plan(shard_hosts_of([], addresses), 1)  # reads only: the plan is never used
    clients = target.clients("checkpoint")
    try:
        return _checkpoint_table(CheckpointStore(clients, target.keys, plan), target)
    finally:
        for r in clients:
            r.close()


def _checkpoint_table(store: CheckpointStore, target: Target) -> Table:
    from canopy.learner.checkpoint.store import Incomplete

    table = Table(title=f"checkpoints of run {target.keys.run}")
    for name in ("id", "step", "learner", "MB", "chunks", "age", "on shards"):
        table.add_column(name)
    now = time.time()
    for ckpt in store.committed():
        try:
            m = store.manifest(ckpt)
        except Incomplete:
            table.add_row(ckpt, "", "", "", "", "", "no valid manifest")
            continue
        created = _number(str(m.get("created_at")))
        shards = sorted({s for p in m["placement"] for s in p})
        table.add_row(
            ckpt,
            str(m.get("step", "")),
            str(m.get("learner", "")),
            f"{sum(m['sizes']) / 2**20:,.1f}",
            str(len(m["sizes"])),
            "" if created is None else f"{now - created:,.0f}s",
            ",".join(map(str, shards)),
        )
    if not table.rows:
        table.caption = f"none committed in {target.where()}"
    return table
