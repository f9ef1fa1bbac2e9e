"""Per-process monitoring in Redis: a stats hash with a TTL, a liveness deadline, events.

Every role owns one Telemetry. The role's loop updates `counters` (plain dict writes, no
I/O on the hot path); a daemon thread writes them to `proc:<role>:<id>` every heartbeat
period with a TTL of three periods and moves the role's deadline in `alive:<role>`.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import queue
import resource
import socket
import threading
import time
from typing import Any

import redis

from canopy import curve
from canopy.keys import Keys

EVENTS_MAXLEN = 10_000
MAX_COMMANDS_PER_PERIOD = 16


class Telemetry:
    """Stats hash + heartbeat + event stream for one process.

    Example:
        tel = Telemetry(r, keys, "actor", 3, period_s=2.0)
        tel.start()
        tel.counters["env_steps_total"] += 8
        tel.event("publish", version="1.50")
    """

    def __init__(
        self,
        r: redis.Redis,
        keys: Keys,
        role: str,
        ident: int,
        period_s: float,
        commands: tuple[str, ...] = (),
    ):
        self.r, self.keys, self.role, self.ident, self.period_s = r, keys, role, ident, period_s
        self.counters: dict[str, Any] = {}
        # Operator commands this role understands, pushed with RPUSH onto `control:<role>:<id>`
        # (Sidekiq-style) and taken here once per period; the role loop drains `commands`.
        self.accepted = commands
        self.commands: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.state = "starting"
        self._static = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": round(time.time(), 3),
        }
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="telemetry", daemon=True)

    def start(self) -> None:
        """Write the stats once now, then every period on a daemon thread."""
        self.flush()
        self._thread.start()

    def set_state(self, state: str) -> None:
        """Set the `state` field (running, paused, ...) and write it at once."""
        self.state = state
        self.flush()

    def event(self, kind: str, **fields: Any) -> None:
        """Append to the run's event stream; failures are swallowed (monitoring is best effort)."""
        entry = {"kind": kind, "role": self.role, "id": self.ident, **fields}
        with contextlib.suppress(redis.RedisError):
            self.r.xadd(
                self.keys.events,
                {k: str(v) for k, v in entry.items()},
                maxlen=EVENTS_MAXLEN,
                approximate=True,
            )

    def flush(self, take_commands: bool = True) -> None:
        """Write the stats hash and liveness deadline, and take pending operator commands;
        Redis errors are swallowed (the next period tries again)."""
        ttl = max(1, round(3 * self.period_s))
        key = self.keys.proc(self.role, self.ident)
        mapping = {
            **self._static,
            "state": self.state,
            "updated_at": round(time.time(), 3),
            "rss_bytes": rss_bytes(),
            "curve_refused_total": curve.refused_total(),  # peers without an authorized key
        }
        mapping.update({k: _scalar(v) for k, v in dict(self.counters).items()})
        try:
            pipe = self.r.pipeline(transaction=False)
            pipe.hset(key, mapping=mapping)
            pipe.expire(key, ttl)
            pipe.zadd(self.keys.alive(self.role), {str(self.ident): time.time() + ttl})
            if take_commands and self.accepted:
                pipe.lpop(self.keys.control(self.role, self.ident), MAX_COMMANDS_PER_PERIOD)
            replies = pipe.execute()
        except redis.RedisError:
            return
        for raw in (replies[-1] or []) if take_commands and self.accepted else []:
            command = raw.decode("utf-8", "replace")[:64]
            if command in self.accepted:
                self.commands.put(command)
                self.event("command", command=command)
            else:
                self.counters["rejected_commands_total"] = self.counters.get("rejected_commands_total", 0) + 1
                accepted = ",".join(self.accepted)
                self.event("rejected_input", what="command", command=command, accepted=accepted)

    def close(self, state: str = "stopped") -> None:
        """Stop the heartbeat, write the final state and leave the liveness set."""
        self._stop.set()
        self.state = state
        self.flush(take_commands=False)  # a command left now waits for the next process
        with contextlib.suppress(redis.RedisError):
            self.r.zrem(self.keys.alive(self.role), str(self.ident))

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.flush()


def rss_bytes() -> int:
    """This process's resident memory now (Linux /proc; peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _libc_trim() -> Any:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


_MALLOC_TRIM = _libc_trim()


def trim_heap() -> None:
    """Give the heap's free pages back to the OS (glibc's malloc_trim; a no-op elsewhere).

    Why: a server whose requests come in bursts (a replay shard holding back inserts from
    a thousand actors) frees them all afterwards, but glibc keeps the pages, so RSS shows
    the highest burst ever rather than what is in use; trimming now and then makes RSS,
    which operators and the soak bench watch for leaks, track the live data.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _scalar(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 6)
    return value if isinstance(value, int | str | bytes) else str(value)
