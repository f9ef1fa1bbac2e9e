"""Checkpoints in replicated Redis shards: write, commit, read back, verify, retain, repair.

Data flow: writer thread -> `CheckpointStore.write(snapshot)`:
  1. chunks (metadata chunk 0, then slices of the flat buffer, `chunk_bytes` each) go to
     the R shards the placement plan names, with a TTL so a torn write cleans itself up;
  2. every chunk acknowledged on R shards -> PERSIST on each replica;
  3. commit: a Lua script on the root shard checks the lease token (fencing), then writes
     the manifest (chunk sizes, xxh3 digests, placement) and adds the id to `ckpt:index`.
     Only then is the manifest copied to the other shards. The manifest is written last,
     so nothing points at a chunk that is not acknowledged;
  4. retention drops checkpoints older than the newest `keep` (manifest first).
Recovery (`recover`) walks committed ids newest first, and loads the first whose every
chunk has a reachable replica with the right length and digest; corrupt or missing
replicas are reported and skipped. `repair` re-replicates chunks of retained
checkpoints until each has R valid copies on live shards again; the writer runs it by
itself whenever `run_ids` shows a shard that died or restarted (writer.py).
Before each commit, `guard` (the lease's local deadline check, lease.py) runs too.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis
import xxhash
from redis.backoff import NoBackoff
from redis.retry import Retry

from canopy.errors import CanopyError, ProtocolError
from canopy.keys import Keys
from canopy.learner.checkpoint.placement import Plan
from canopy.learner.checkpoint.state import Snapshot
from canopy.lease import fenced_script
from canopy.version import Version

PENDING_TTL_MS = 600_000  # chunks of a checkpoint that never commits vanish after this
MAX_MANIFEST_BYTES = 4 << 20
MAX_CHUNK_BYTES = 64 << 20  # far above any chunk_bytes a learner uses; bounds a forged manifest

# KEYS: lease, manifest, index; ARGV: token, doc, digest, id, score.
FENCED_COMMIT = fenced_script("""
redis.call('HSET', KEYS[2], 'doc', ARGV[2], 'digest', ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[4])
return 1
""")


def fail_fast(r: redis.Redis, timeout_s: float = 2.0) -> redis.Redis:
    """Make a shard client give up at once on a dead shard (no retries, short timeouts).

    Recovery and writes walk past lost shards to the next replica; redis-py's default
    retries with backoff would turn each dead shard into seconds of waiting.
    """
    r.set_retry(Retry(NoBackoff(), 0))
    r.connection_pool.connection_kwargs.update(socket_timeout=timeout_s, socket_connect_timeout=1.0)
    return r


class CheckpointFenced(CanopyError):
    """The commit was refused: this learner no longer holds the lease."""


class Incomplete(CanopyError):
    """A checkpoint with a chunk that has no reachable, checksum-valid replica."""


def digest(data: bytes | memoryview) -> str:
    """The xxh3-64 hex digest manifests record for every chunk."""
    return xxhash.xxh3_64_hexdigest(data)


@dataclass
class CommitResult:
    """What one committed write took: bytes, chunks and seconds."""

    ckpt: str
    nbytes: int
    chunks: int
    write_s: float  # chunks acknowledged on every replica
    commit_s: float  # from the first chunk sent to the manifest visible


@dataclass
class Loaded:
    """A checkpoint read back and verified, with the replicas and ids passed over on the way."""

    ckpt: str
    snapshot: Snapshot
    manifest: dict[str, Any]
    bad_replicas: list[str] = field(default_factory=list)  # "chunk i on shard s: why"
    skipped: list[str] = field(default_factory=list)  # newer ids that could not be loaded


class RateLimiter:
    """Token bucket on bytes: the writer waits so it never sends faster than `rate` B/s."""

    def __init__(self, rate: float):
        self.rate = rate
        self.t = time.monotonic()
        self.allowance = 0.0

    def take(self, nbytes: int) -> None:
        """Spend `nbytes`, sleeping off any overdraft (a rate of 0 never waits)."""
        if self.rate <= 0:
            return
        now = time.monotonic()
        self.allowance = min(self.allowance + (now - self.t) * self.rate, self.rate * 0.05)
        self.t = now
        self.allowance -= nbytes
        if self.allowance < 0:
            time.sleep(-self.allowance / self.rate)


class CheckpointStore:
    """Example:
    store = CheckpointStore(clients, keys, plan, chunk_bytes=1 << 20, keep=3)
    store.write(snapshot, ckpt="7.500", token=lease.token, learner=0)
    loaded = store.recover()  # newest checkpoint with every chunk valid somewhere, or None
    """

    def __init__(
        self,
        shards: list[redis.Redis],
        keys: Keys,
        plan: Plan,
        chunk_bytes: int = 1 << 20,
        keep: int = 3,
        rate_bytes_s: float = 0.0,
        root: int = 0,
    ):
        self.shards, self.keys, self.plan = [fail_fast(r) for r in shards], keys, plan
        self.chunk_bytes, self.keep, self.root = chunk_bytes, keep, root
        self.rate = RateLimiter(rate_bytes_s)
        self._commit = shards[root].register_script(FENCED_COMMIT)

    # ---- write --------------------------------------------------------------------
    def write(
        self,
        snap: Snapshot,
        ckpt: str,
        token: str,
        learner: int,
        on_chunk: Callable[[int], None] | None = None,
        guard: Callable[[], None] | None = None,
    ) -> CommitResult:
        """Send, acknowledge, commit. Raises CheckpointFenced or redis errors; never half-visible.

        `guard` runs just before the commit and raises (any CanopyError) when this learner
        must not commit any more, e.g. `Lease.check` once the lease's local deadline passed.
        """
        t0 = time.monotonic()
        meta = snap.meta_bytes()
        flat = memoryview(snap.flat.numpy()) if snap.nbytes else memoryview(b"")
        parts: list[memoryview] = [memoryview(meta)]
        parts += [flat[i : i + self.chunk_bytes] for i in range(0, len(flat), self.chunk_bytes)]
        live = set(self.alive())
        placement = [self._live_placement(i, live) for i in range(len(parts))]
        # Per shard, one pipeline of a few chunks at a time: acks arrive while later
        # chunks are still being sent, and no pipeline buffers the whole state.
        batch = max(1, (4 << 20) // self.chunk_bytes)
        for start in range(0, len(parts), batch):
            idx = range(start, min(start + batch, len(parts)))
            by_shard: dict[int, list[int]] = {}
            for i in idx:
                for s in placement[i]:
                    by_shard.setdefault(s, []).append(i)
            for s, chunk_ids in by_shard.items():
                pipe = self.shards[s].pipeline(transaction=False)
                for i in chunk_ids:
                    self.rate.take(len(parts[i]))
                    pipe.set(self.keys.ckpt_chunk(ckpt, i), parts[i], px=PENDING_TTL_MS)
                pipe.execute()
            if on_chunk is not None:
                on_chunk(idx[-1])
        write_s = time.monotonic() - t0
        for s in {s for p in placement for s in p}:
            pipe = self.shards[s].pipeline(transaction=False)
            for i, p in enumerate(placement):
                if s in p:
                    pipe.persist(self.keys.ckpt_chunk(ckpt, i))
            pipe.execute()
        doc = json.dumps(
            {
                "id": ckpt,
                "learner": learner,
                "step": snap.step,
                "bytes": len(flat),
                "meta_bytes": len(meta),
                "sizes": [len(p) for p in parts],
                "digests": [digest(p) for p in parts],
                "placement": placement,
                "created_at": time.time(),
            }
        )
        _guarded(guard, ckpt)
        self._publish_manifest(ckpt, doc, token)
        result = CommitResult(ckpt, len(flat), len(parts), write_s, time.monotonic() - t0)
        self.retain()
        return result

    def _live_placement(self, chunk: int, live: set[int]) -> list[int]:
        """The plan's shards for `chunk`, with a dead shard swapped for a live one (distinct host first)."""
        out = [s for s in self.plan.shards_for(chunk) if s in live]
        want = len(self.plan.shards_for(chunk))
        hosts = {self.plan.shard_hosts[s] for s in out}
        spare = sorted(
            live - set(out), key=lambda s: (self.plan.shard_hosts[s] in hosts, (s - chunk) % len(self.shards))
        )
        out += spare[: want - len(out)]
        if not out:
            raise Incomplete("no Redis shard answers: cannot write a checkpoint")
        return out

    def _publish_manifest(self, ckpt: str, doc: str, token: str) -> None:
        d, score = digest(doc.encode()), Version.parse(ckpt).packed()
        ok = self._commit(
            keys=[self.keys.lease, self.keys.ckpt_manifest(ckpt), self.keys.ckpt_index],
            args=[token, doc, d, ckpt, score],
        )
        if not ok:
            raise CheckpointFenced(f"checkpoint {ckpt} not committed: the lease is no longer {token!r}")
        # Copies let recovery find the manifest when the root shard is gone.
        for i, r in enumerate(self.shards):
            if i == self.root:
                continue
            try:
                pipe = r.pipeline(transaction=True)
                pipe.hset(self.keys.ckpt_manifest(ckpt), mapping={"doc": doc, "digest": d})
                pipe.zadd(self.keys.ckpt_index, {ckpt: score})
                pipe.execute()
            except redis.RedisError:
                pass  # a dead shard; repair rewrites manifests later

    # ---- read ---------------------------------------------------------------------
    def committed(self) -> list[str]:
        """Committed checkpoint ids on any reachable shard, newest first."""
        ids: dict[str, Version] = {}
        for r in self.shards:
            try:
                members = r.zrange(self.keys.ckpt_index, 0, -1)
            except redis.RedisError:
                continue
            for m in members:
                try:
                    ids[m.decode()] = Version.parse(m)
                except (ProtocolError, UnicodeDecodeError):
                    continue  # not an id this store wrote; recovery ignores it
        return sorted(ids, key=ids.__getitem__, reverse=True)

    def manifest(self, ckpt: str) -> dict[str, Any]:
        """The first manifest copy whose digest matches; raises Incomplete when none does."""
        for r in self._root_first():
            try:
                fields = r.hgetall(self.keys.ckpt_manifest(ckpt))
            except redis.RedisError:
                continue
            doc, d = fields.get(b"doc"), fields.get(b"digest")
            if doc is None or d is None or len(doc) > MAX_MANIFEST_BYTES or digest(doc) != d.decode():
                continue
            if _well_formed(doc, ckpt, len(self.shards)):
                return json.loads(doc)
        raise Incomplete(f"checkpoint {ckpt}: no valid manifest on any reachable shard")

    def load(self, ckpt: str, bad: list[str] | None = None) -> Loaded:
        """Read and verify every chunk, trying each replica; raises Incomplete."""
        m = self.manifest(ckpt)
        bad = [] if bad is None else bad
        parts: list[bytes] = []
        for i, (size, d, shards) in enumerate(zip(m["sizes"], m["digests"], m["placement"], strict=True)):
            data = self._valid_replica(ckpt, i, size, d, shards, bad)
            if data is None:
                raise Incomplete(f"checkpoint {ckpt}: chunk {i} has no valid replica on shards {shards}")
            parts.append(data)
        try:
            snap = Snapshot.from_bytes(parts[0], b"".join(parts[1:]))
        except ProtocolError as exc:
            raise Incomplete(f"checkpoint {ckpt}: {exc}") from None
        return Loaded(ckpt, snap, m, bad)

    def recover(self) -> Loaded | None:
        """The newest committed checkpoint that loads completely, or None if there is none."""
        skipped: list[str] = []
        bad: list[str] = []
        for ckpt in self.committed():
            try:
                loaded = self.load(ckpt, bad)
            except Incomplete as exc:
                skipped.append(str(exc))
                continue
            loaded.skipped = skipped
            return loaded
        return None

    def _valid_replica(
        self, ckpt: str, i: int, size: int, d: str, shards: list[int], bad: list[str]
    ) -> bytes | None:
        for s in shards:
            try:
                data = self.shards[s].get(self.keys.ckpt_chunk(ckpt, i))
            except redis.RedisError as exc:
                bad.append(f"{ckpt} chunk {i} on shard {s}: unreachable ({type(exc).__name__})")
                continue
            if data is None:
                bad.append(f"{ckpt} chunk {i} on shard {s}: missing")
            elif len(data) != size or digest(data) != d:
                bad.append(f"{ckpt} chunk {i} on shard {s}: checksum mismatch")
            else:
                return data
        return None

    def _root_first(self) -> list[redis.Redis]:
        return [self.shards[self.root], *(r for i, r in enumerate(self.shards) if i != self.root)]

    # ---- retention and repair -----------------------------------------------------
    def retain(self) -> list[str]:
        """Delete committed checkpoints older than the newest `keep`; returns the ids dropped."""
        dropped = self.committed()[self.keep :]
        for ckpt in dropped:
            try:
                m = self.manifest(ckpt)
            except Incomplete:
                m = None
            # Manifest and index entry first: a half-deleted checkpoint is never visible.
            for r in self.shards:
                try:
                    pipe = r.pipeline(transaction=True)
                    pipe.zrem(self.keys.ckpt_index, ckpt)
                    pipe.delete(self.keys.ckpt_manifest(ckpt))
                    pipe.execute()
                except redis.RedisError:
                    continue
            if m is not None:
                for i, shards in enumerate(m["placement"]):
                    for s in shards:
                        try:
                            self.shards[s].delete(self.keys.ckpt_chunk(ckpt, i))
                        except redis.RedisError:
                            continue
        return dropped

    def alive(self) -> list[int]:
        """Indices of the shards that answer a PING now."""
        out = []
        for i, r in enumerate(self.shards):
            try:
                r.ping()
                out.append(i)
            except redis.RedisError:
                continue
        return out

    def run_ids(self) -> list[str | None]:
        """Each shard's Redis run id (a new one after every restart); None where a shard is dead."""
        out: list[str | None] = []
        for r in self.shards:
            try:
                out.append(str(r.info("server")["run_id"]))
            except redis.RedisError:
                out.append(None)
        return out

    def repair(self, token: str, guard: Callable[[], None] | None = None) -> int:
        """Copy chunks with fewer than R valid replicas on live shards onto other live shards.

        Prefers shards on hosts that do not already hold the chunk. Rewrites each changed
        manifest through the fenced commit. Returns the number of copies made.
        """
        live = set(self.alive())
        copies = 0
        for ckpt in self.committed():
            try:
                m = self.manifest(ckpt)
            except Incomplete:
                continue
            changed = False
            for i, shards in enumerate(m["placement"]):
                size, d = m["sizes"][i], m["digests"][i]
                good = [s for s in shards if s in live and self._check(ckpt, i, s, size, d)]
                if len(good) >= self.plan.replicas or not good:
                    continue
                data = self.shards[good[0]].get(self.keys.ckpt_chunk(ckpt, i))
                held = {self.plan.shard_hosts[s] for s in good}
                spare = sorted(live - set(good), key=lambda s: (self.plan.shard_hosts[s] in held, s))
                for s in spare[: self.plan.replicas - len(good)]:
                    self.shards[s].set(self.keys.ckpt_chunk(ckpt, i), data)
                    good.append(s)
                    copies += 1
                m["placement"][i] = good
                changed = True
            if changed:
                _guarded(guard, ckpt)
                self._publish_manifest(ckpt, json.dumps(m), token)
        return copies

    def _check(self, ckpt: str, i: int, s: int, size: int, d: str) -> bool:
        try:
            data = self.shards[s].get(self.keys.ckpt_chunk(ckpt, i))
        except redis.RedisError:
            return False
        return data is not None and len(data) == size and digest(data) == d


def _well_formed(doc: bytes, ckpt: str, n_shards: int) -> bool:
    """Whether a manifest document has the shape `load` relies on: anyone who can write to
    a shard can store any document under a digest that matches it."""
    try:
        m = json.loads(doc)
        sizes, digests, placement = m["sizes"], m["digests"], m["placement"]
        return (
            m["id"] == ckpt
            and len(sizes) == len(digests) == len(placement) > 0
            and all(isinstance(x, int) and 0 <= x <= MAX_CHUNK_BYTES for x in sizes)
            and all(isinstance(x, str) for x in digests)
            and all(
                isinstance(p, list) and p and all(isinstance(s, int) and 0 <= s < n_shards for s in p)
                for p in placement
            )
        )
    except (ValueError, TypeError, KeyError):
        return False


def _guarded(guard: Callable[[], None] | None, ckpt: str) -> None:
    """Run the pre-commit guard; any refusal becomes CheckpointFenced (nothing is committed)."""
    if guard is None:
        return
    try:
        guard()
    except CanopyError as exc:
        raise CheckpointFenced(f"checkpoint {ckpt} not committed: {exc}") from None
