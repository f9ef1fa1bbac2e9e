"""The active learner's lease in Redis, and fencing by epoch.

Data flow: learner start -> `Lease.acquire` (waits while another learner holds it; a warm
standby sits here) -> a new epoch from `learner:epoch`, stored in the lease value
`<epoch>:<learner>` with a TTL -> a renewal thread keeps it alive -> every publish and
checkpoint commit runs a Lua script that first compares the lease value with this
learner's token (`fenced_script` below), so the check and the write are one atomic step in
Redis. A learner that lost its lease (paused, partitioned, restarted after a kill) finds
another token there and can neither publish nor commit, even if it comes back.

The epoch never goes back, even when the root shard loses its data (killed without
persistence, restarted empty by `canopy up`): the new epoch is max(INCR, floor + 1), where
the floor (`epoch_floor`, given by the learner) is the newest epoch named by any committed
checkpoint on any shard; checkpoint manifests are copied to every shard, so the floor
survives the loss of the root.

The holder also enforces the TTL on its own clock: `deadline` is the monotonic time at
which Redis may expire the lease, counted from the moment the last successful acquire or
renewal was *sent* (Redis starts the TTL later than that, never earlier). Past the
deadline minus a small margin the learner treats itself as fenced (`check` raises,
`lost` is set), so a holder that was paused or whose Redis is slow stops before a
successor can possibly take over, not only when its next script is refused.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import redis

from canopy.errors import CanopyError, DeadlineExceeded
from canopy.keys import Keys

# The fencing check: only the holder of the current lease token may go on. KEYS[1] must
# be the lease key and ARGV[1] the caller's token; a refused script returns 0.
FENCE = "\nif redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end"


def token(epoch: int, owner: int) -> str:
    """The lease value `<epoch>:<owner>` that `ACQUIRE` stores and fenced scripts compare."""
    return f"{epoch}:{owner}"


def parse_token(value: bytes | str | None) -> tuple[int, int] | None:
    """(epoch, owner) of a lease value as read back; None when no lease is held.

    An empty value counts as absent: `redis-cli --raw` prints a missing key as an empty
    line. Raises ValueError when the value is not `<epoch>:<owner>` with integer parts.
    """
    if not value:
        return None
    text = value.decode() if isinstance(value, bytes) else value
    epoch, sep, owner = text.partition(":")
    try:
        if sep:
            return int(epoch), int(owner)
    except ValueError:
        pass
    raise ValueError(f"malformed learner lease token {text!r}, expected '<epoch>:<owner>'")


def follower_rank(learners: int, ident: int) -> int | None:
    """The fixed rank of learner `ident` when it follows a group of `learners`; None for a
    lease candidate (id 0, or the standby, id `learners`), which becomes rank 0 with the lease."""
    return ident if 0 < ident < learners else None


def fenced_script(body: str) -> str:
    """Lua that runs `body` only while the caller holds the lease, atomically with the check.

    The caller passes the lease key as KEYS[1] and its token (`Lease.token`) as ARGV[1];
    `body` uses the rest and must not return 0 on success, since 0 means fenced.
    """
    return FENCE + "\n" + body.lstrip("\n")


# KEYS[1] lease, KEYS[2] epoch counter; ARGV[1] learner id, ARGV[2] ttl ms, ARGV[3] epoch floor.
# The value written is `token(epoch, learner)`.
ACQUIRE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local epoch = redis.call('INCR', KEYS[2])
local floor = tonumber(ARGV[3])
if epoch <= floor then
  epoch = floor + 1
  redis.call('SET', KEYS[2], epoch)
end
redis.call('SET', KEYS[1], epoch .. ':' .. ARGV[1], 'PX', ARGV[2])
return epoch
"""
# KEYS[1] lease; ARGV[1] token, ARGV[2] ttl ms.
RENEW = fenced_script("""
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
""")


# Clock-rate slack between this host and Redis: the local deadline ends this much early.
DEADLINE_MARGIN_S = 0.05


class Fenced(CanopyError):
    """This learner's lease is gone: another learner (a newer epoch) is in charge."""


class Lease:
    """Example:
    lease = Lease(r, keys, learner=0, ttl_s=1.0, epoch_floor=lambda: newest_checkpoint_epoch)
    epoch = lease.acquire(timeout=None, stop=stop)  # blocks while another learner is active
    lease.start_renewing(on_lost=stop.set)
    lease.token  # '7:0', what fenced scripts compare
    """

    def __init__(
        self,
        r: redis.Redis,
        keys: Keys,
        learner: int,
        ttl_s: float,
        epoch_floor: Callable[[], int] | None = None,
    ):
        self.r, self.keys, self.learner, self.ttl_s = r, keys, learner, ttl_s
        self.epoch_floor = epoch_floor  # the new epoch is above whatever this returns
        self.epoch = 0
        self.token = ""
        self.lost = threading.Event()
        self.deadline = 0.0  # monotonic; past it this learner holds no lease (see module doc)
        self._acquire = r.register_script(ACQUIRE)
        self._renew = r.register_script(RENEW)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def try_acquire(self) -> bool:
        """Take the lease with a new epoch if nobody holds it; True when taken."""
        floor = 0
        if self.epoch_floor is not None:
            if self.r.exists(self.keys.lease):
                return False  # held: no need to ask every shard for the floor
            floor = self.epoch_floor()
        sent = time.monotonic()
        epoch = int(
            self._acquire(keys=[self.keys.lease, self.keys.epoch], args=[self.learner, self._ttl_ms, floor])
        )
        if epoch:
            self.epoch, self.token = epoch, token(epoch, self.learner)
            self.deadline = sent + self.ttl_s
            self.lost.clear()
        return bool(epoch)

    def remaining(self) -> float:
        """Seconds this learner may still act as the holder, by its own clock (<= 0: fenced)."""
        return self.deadline - max(self.ttl_s * 0.05, DEADLINE_MARGIN_S) - time.monotonic()

    def check(self) -> None:
        """Raise Fenced unless the lease is held and its local deadline has not passed.

        Called before every publish and checkpoint commit, in addition to the atomic token
        check in Redis: it needs no round trip, so a learner resumed after a long pause
        stops at once instead of acting on a lease that may already be someone else's.
        """
        if self.lost.is_set():
            raise Fenced(f"learner {self.learner} epoch {self.epoch} lost its lease")
        if self.remaining() <= 0:
            self.lost.set()
            raise Fenced(
                f"learner {self.learner} epoch {self.epoch}: lease not renewed within its "
                f"{self.ttl_s:.2f}s TTL (local deadline passed)"
            )

    def acquire(
        self, timeout: float | None, stop: threading.Event | None = None, poll_s: float = 0.05
    ) -> int:
        """Wait until the lease is free and take it with a new epoch; returns the epoch.

        Raises DeadlineExceeded after `timeout` seconds (None: wait until `stop` is set,
        then raise too).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                if self.try_acquire():
                    return self.epoch
            except redis.ConnectionError:
                pass  # the root shard is restarting; keep waiting within the deadline
            if stop is not None and stop.is_set():
                raise DeadlineExceeded("stopped while waiting for the learner lease")
            if deadline is not None and time.monotonic() > deadline:
                holder = self.holder()
                raise DeadlineExceeded(f"learner lease still held by {holder!r} after {timeout:.1f}s")
            time.sleep(poll_s)

    def holder(self) -> str | None:
        """The current lease value (`<epoch>:<learner>`), or None when it is free."""
        value = self.r.get(self.keys.lease)
        return value.decode() if value is not None else None

    def renew(self) -> bool:
        """Extend the lease if it is still ours; False (and `lost` set) when it is not.

        A lease whose local deadline already passed is never renewed: this learner has
        stopped acting as the holder, and extending the key would only delay a successor.
        """
        sent = time.monotonic()
        if self.lost.is_set() or self.remaining() <= 0:
            self.lost.set()
            return False
        ok = bool(self._renew(keys=[self.keys.lease], args=[self.token, self._ttl_ms]))
        if ok and not self.lost.is_set():
            self.deadline = sent + self.ttl_s
        else:
            self.lost.set()
        return ok

    def start_renewing(self, on_lost: Callable[[], None]) -> None:
        """Renew every TTL/4 on a daemon thread; call `on_lost` once if the lease goes."""

        def loop() -> None:
            while not self._stop.wait(min(self.ttl_s / 4, max(self.remaining(), 0.0))):
                try:
                    if self.renew():
                        continue
                except redis.RedisError:
                    # Unreachable: the lease may still be ours, but not past its local deadline.
                    if self.remaining() > 0:
                        continue
                    self.lost.set()
                on_lost()
                return

        self._thread = threading.Thread(target=loop, name="lease", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop renewing; the lease then expires after its TTL."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.ttl_s)

    @property
    def _ttl_ms(self) -> int:
        return max(1, round(self.ttl_s * 1000))
