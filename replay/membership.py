"""Which replay shards are alive, and which shard each actor writes to.

Place in the data flow: each replay shard (`canopy replay`, replay/role.py) calls `join`,
which registers its id and endpoint in Redis and keeps pushing its liveness deadline
forward; actors' InsertClients and learners' SampleClients hold a `Members` view (polled
on a background thread, never on their hot path) and follow it when shards come and go.

Keys (canopy/keys.py), under `canopy:<run>:`:
    replay:members    sorted set, member = shard id, score = liveness deadline (unix s)
    replay:endpoints  hash, shard id -> ZeroMQ endpoint
A shard is live while its deadline is in the future. Deadlines are read and written on the
Redis server's clock (TIME inside the scripts), so hosts with skewed clocks still agree on
who is alive. A shard that stops cleanly sets its deadline to 0: clients drop it at their
next poll, and `ZRANGEBYSCORE replay:members -inf <now>` lists it with the dead.
Nothing read back is trusted: a bad id or endpoint is skipped and counted.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Collection, Mapping, Sequence

import redis
import xxhash

from canopy.keys import Keys

MAX_SHARDS = 1024  # members read per poll: bounds what a corrupted set can make a client do
_ENDPOINT = re.compile(r"(tcp|ipc)://[\x21-\x7e]{1,240}")

_REGISTER = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
return 1
"""

# Returns [members key exists (0/1), id, endpoint, id, endpoint, ...] for the live shards.
_LIVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local out = {redis.call('EXISTS', KEYS[1])}
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. string.format('%.6f', now), '+inf',
                       'LIMIT', 0, tonumber(ARGV[1]))
for _, id in ipairs(ids) do
  out[#out + 1] = id
  out[#out + 1] = redis.call('HGET', KEYS[2], id) or ''
end
return out
"""


def shard_for(actor_id: int, shard_ids: Collection[int]) -> int:
    """The shard an actor writes to: rendezvous (highest random weight) hashing over `shard_ids`.

    Each (actor, shard) pair gets a fixed pseudo-random score and the actor takes its best
    shard. Unlike `hash % n`, which reshuffles almost every actor when n changes, a shard that
    leaves moves only its own actors (each to its second-best shard), and a shard that joins
    takes about 1/n of the actors, each from wherever it was: the fewest moves possible.
    """
    if not shard_ids:
        raise ValueError("shard_for needs at least one shard id")
    return max(shard_ids, key=lambda s: xxhash.xxh64_intdigest(f"actor:{actor_id}:shard:{s}".encode()))


class Members:
    """The live replay shards as `(generation, {shard id: endpoint})`; fixed endpoints here.

    `generation` grows whenever the set changes, so a client notices a change with one
    attribute read. Shard ids of a static list are the list positions (`cluster.replay[i]`).

    Example:
        members = Members(["tcp://127.0.0.1:5555", "tcp://127.0.0.1:5556"])
        generation, endpoints = members.view
    """

    def __init__(self, endpoints: Sequence[str] | Mapping[int, str]):
        fixed = endpoints if isinstance(endpoints, Mapping) else dict(enumerate(endpoints))
        self.view: tuple[int, dict[int, str]] = (0, dict(fixed))

    def close(self) -> None:
        """Stop following (nothing to stop for a fixed list)."""


class RedisMembers(Members):
    """Follows `replay:members` in Redis, re-read every `poll_s` on a daemon thread.

    Until any shard of this run has registered (the key does not exist) the view is
    `fallback`, the endpoints from config; after that Redis alone decides. When Redis cannot
    be read the last view stays: a Redis outage must not make clients drop healthy shards.

    Example:
        members = RedisMembers(r, keys, poll_s=1.0, fallback=cfg.cluster.replay)
        client = InsertClient(members, inflight=4, key=actor_id)
        ...
        members.close()
    """

    def __init__(self, r: redis.Redis, keys: Keys, poll_s: float, fallback: Sequence[str] = ()):
        super().__init__(fallback)
        self.r, self.keys, self.poll_s = r, keys, poll_s
        self.rejected_total = 0  # entries with a bad id or endpoint
        self.errors_total = 0  # polls Redis did not answer
        self._live = r.register_script(_LIVE)
        self._stop = threading.Event()
        self.poll()  # the first view is ready before any client asks
        self._thread = threading.Thread(target=self._run, name="replay-members", daemon=True)
        self._thread.start()

    def poll(self) -> None:
        """Read the live set once and publish it when it changed."""
        try:
            reply = self._live(keys=[self.keys.replay_members, self.keys.replay_endpoints], args=[MAX_SHARDS])
        except redis.RedisError:
            self.errors_total += 1
            return
        if not reply or not reply[0]:
            return  # no shard of this run registered yet: keep the configured endpoints
        live = {}
        for raw_id, raw_endpoint in zip(reply[1::2], reply[2::2], strict=True):
            ident, endpoint = _check(raw_id, raw_endpoint)
            if ident is None:
                self.rejected_total += 1
                continue
            live[ident] = endpoint
        generation, current = self.view
        if live != current:
            self.view = (generation + 1, live)  # one tuple swap: readers never see half a change

    def close(self) -> None:
        """Stop the polling thread."""
        self._stop.set()
        self._thread.join(timeout=self.poll_s + 5)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.poll()


def join(r: redis.Redis, keys: Keys, ident: int, endpoint: str, ttl_s: float, stop: threading.Event) -> None:
    """Register replay shard `ident` at `endpoint` and keep it live until `stop` is set.

    The deadline moves to now + `ttl_s` every third of `ttl_s`, on a daemon thread; once
    `stop` is set the shard leaves (deadline 0). A killed shard just stops refreshing and
    drops out when its deadline passes. The first registration happens before returning,
    so a Redis that cannot be reached fails the shard's start loudly.
    """
    register = r.register_script(_REGISTER)
    members = [keys.replay_members, keys.replay_endpoints]
    register(keys=members, args=[ident, endpoint, ttl_s])

    def beat() -> None:
        while not stop.wait(ttl_s / 3):
            with contextlib.suppress(redis.RedisError):  # a missed beat is retried next period
                register(keys=members, args=[ident, endpoint, ttl_s])
        with contextlib.suppress(redis.RedisError):
            r.zadd(keys.replay_members, {str(ident): 0})

    threading.Thread(target=beat, name="replay-membership", daemon=True).start()


def _check(raw_id: bytes, raw_endpoint: bytes) -> tuple[int | None, str]:
    """A member entry as (id, endpoint), or (None, '') when it does not parse."""
    try:
        ident, endpoint = int(raw_id), raw_endpoint.decode("ascii")
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None, ""
    if not 0 <= ident < 2**31 or not _ENDPOINT.fullmatch(endpoint):
        return None, ""
    return ident, endpoint
