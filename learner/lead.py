"""What only the lease holder among the learners does: take the lease, publish, checkpoint.

Place in the data flow: learner/role.py builds the model and trains (`_Trainer`, the same
on every rank of a group); the lease holder (rank 0) first waits here for the lease
(`take_lease`; a warm standby waits with the newest checkpoint prefetched), and after each
update hands over to `Lead`: every `publish_every` updates the exported arrays go to the
Redis root as a new policy version (learner/publisher.py, and from there down the cache
tree to the actors), and every `checkpoint.every_s` (or on an operator's command) the
training state is captured for the background writer (learner/checkpoint/writer.py, onto
the Redis shards of `make_store`'s placement plan). The lease fences both: a learner that
lost it can neither publish nor commit.
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
import time

import redis

from canopy.cache.codecs import Encoder
from canopy.config import Config, to_dict
from canopy.errors import DeadlineExceeded
from canopy.keys import Keys
from canopy.learner.checkpoint.placement import make_plan, shard_hosts_of
from canopy.learner.checkpoint.prefetch import Prefetcher
from canopy.learner.checkpoint.state import Capturer, sampler_state
from canopy.learner.checkpoint.store import CheckpointStore
from canopy.learner.checkpoint.writer import Writer
from canopy.learner.group import LearnerGroup
from canopy.learner.model import Model
from canopy.learner.obsnorm import ObsNorm
from canopy.learner.publisher import Publisher
from canopy.lease import Lease
from canopy.redisconn import connect
from canopy.replay.client import SampleClient
from canopy.telemetry import Telemetry
from canopy.version import Version


def make_store(cfg: Config, ident: int) -> CheckpointStore:
    """The checkpoint store over every Redis shard, with this learner's placement plan."""
    ck = cfg.checkpoint
    clients = [connect(cfg.cluster, "learner", ident, shard=i) for i in range(len(cfg.cluster.redis))]
    hosts = shard_hosts_of(ck.shard_hosts, cfg.cluster.redis)
    plan = make_plan(hosts, ck.replicas, ck.learner_host, ident, ck.placement)
    return CheckpointStore(
        clients, Keys(cfg.run.name), plan, ck.chunk_mb << 20, ck.keep, ck.rate_mb_s * 2**20
    )


def take_lease(
    lease: Lease,
    r: redis.Redis,
    keys: Keys,
    store: CheckpointStore,
    tel: Telemetry,
    stop: threading.Event,
    standby: bool,
    checkpoints: bool,
) -> tuple[Prefetcher | None, float] | None:
    """Wait for the lease, then renew it (losing it sets `stop`): the standby's prefetcher
    and when the lease was taken; None when `stop` came first.

    A standby only takes over: it leaves a fresh run's first lease to the primary.
    """
    waiting = standby or lease.holder() is not None
    if waiting:
        tel.set_state("standby")
    # A standby keeps the newest checkpoint read and verified while it waits (warm state).
    prefetch = Prefetcher(store) if checkpoints and waiting else None
    try:
        if standby:
            while not _run_started(r, keys, store) and not stop.wait(0.05):
                pass
        lease.acquire(timeout=None, stop=stop)
    except DeadlineExceeded:
        if prefetch is not None:
            prefetch.take(timeout=1.0)
        return None
    t_lease = time.monotonic()
    if standby:
        tel.event("failover", epoch=lease.epoch)
    lease.start_renewing(on_lost=stop.set)
    return prefetch, t_lease


class Lead:
    """What only the lease holder does: publish every `publish_every` updates and checkpoint
    every `checkpoint.every_s` (or on an operator's command) through the background writer.
    The lease's local deadline guards every commit and every publish (fencing)."""

    def __init__(
        self,
        cfg: Config,
        ident: int,
        r: redis.Redis,
        keys: Keys,
        tel: Telemetry,
        lease: Lease,
        store: CheckpointStore,
        model: Model,
        parent: str,
        stop: threading.Event,
    ):
        ck = cfg.checkpoint
        self.cfg, self.tel, self.lease, self.model, self.parent = cfg, tel, lease, model, parent
        self.c = tel.counters
        encoder = Encoder(cfg.cache.codec, cfg.cache.codec_levels, cfg.cache.keyframe_every)
        lc = cfg.learner
        self.publisher = Publisher(
            r, keys, ident, lc.keep_versions, lease=lease, encoder=encoder, keep_ledger=lc.keep_ledger
        )
        self.writer = Writer(
            store,
            ident,
            tel.event,
            on_fenced=stop.set,
            guard=lease.check,
            token=lease.token,
            repair_every_s=ck.repair_every_s if ck.enabled else 0.0,
        )
        self.capturer = Capturer(pin=model.device.type == "cuda")
        self.fences_seen = 0
        self.version: Version | None = None
        self.period = ck.every_s if ck.every_s > 0 else math.inf  # 0: only on demand
        self.next_ckpt = time.monotonic() + self.period
        self.deferred = False

    def share_state(self, group: LearnerGroup, ranks: list) -> None:
        """Every rank starts from this rank's state (restored or fresh) and its RNGs; each
        follower finds its own sampler state under `ranks` (none on a fresh start)."""
        snap = self.capturer.capture(self.model.algo, {"ranks": ranks, **_norm_state(self.model.norm)}, {})
        group.broadcast_bytes(snap.meta_bytes())
        group.broadcast_bytes(snap.flat.numpy().tobytes())

    def publish(self, lineage: str) -> None:
        """Publish the exported arrays as a new version; `lineage` is the checkpoint it descends from."""
        self.lease.check()  # no round trip: a learner resumed past its TTL stops here
        algo = self.model.algo
        self.version = self.publisher.publish(
            self.model.export(), step=algo.updates, arch=self.model.arch, checkpoint=lineage
        )
        self.c["versions_published_total"] += 1
        self.c["policy_version"] = str(self.version)

    def start_clock(self) -> None:
        """The first periodic checkpoint falls due one period after training starts."""
        self.next_ckpt = time.monotonic() + self.period

    def checkpoint_due(self) -> bool:
        """A checkpoint is due (period or operator) and the writer is free to take it."""
        if not self.tel.commands.empty() and self.tel.commands.get() == "checkpoint":
            self.next_ckpt = 0.0  # operator: RPUSH control:learner:<id> checkpoint
        if not (self.cfg.checkpoint.enabled and time.monotonic() >= self.next_ckpt):
            return False
        if self.writer.busy():
            # Do not queue behind a slow write: keep it due and take the newest state
            # once the writer is free (every due checkpoint coalesces into one).
            if not self.deferred:
                self.tel.event("checkpoint_deferred", reason="previous checkpoint still writing")
                self.deferred = True
            return False
        return True

    def after_update(self, checkpoint_now: bool, sampler: SampleClient, rank_states: list[bytes]) -> None:
        """Publish when the update count comes due, then checkpoint when `checkpoint_now`."""
        algo = self.model.algo
        if self.capturer.fences > self.fences_seen:  # this update's step waited for a capture's copy
            self.fences_seen = self.capturer.fences
            self.c["checkpoint_stall_ms_last"] += self.capturer.last_fence_wait_s * 1000
        if algo.updates % self.cfg.learner.publish_every == 0:
            self.publish(self.writer.last_committed or self.parent)
        if checkpoint_now:
            self._checkpoint(sampler, rank_states)

    def _checkpoint(self, sampler: SampleClient, rank_states: list[bytes]) -> None:
        """Capture the state for the background writer: metadata now, the tensors on a copy
        thread that the next optimizer step waits for (learner/checkpoint/state.py)."""
        algo, lease, c = self.model.algo, self.lease, self.c
        t1 = time.monotonic()
        state = {**_state_counters(lease.epoch, c, sampler, rank_states), **_norm_state(self.model.norm)}
        snap = self.capturer.capture(algo, state, to_dict(self.cfg), background=True)
        stall_ms = (time.monotonic() - t1) * 1000
        self.writer.submit(snap, f"{lease.epoch}.{algo.updates}", lease.token, stall_ms=round(stall_ms, 2))
        c["checkpoint_stall_ms_last"] = stall_ms
        c["checkpoints_total"] = self.writer.commits
        self.next_ckpt = time.monotonic() + self.period
        self.deferred = False

    def close(self) -> None:
        """Let the writer finish unless fenced (then report the fence), and stop renewing the lease."""
        if self.lease.lost.is_set():
            self.tel.event("fence", what="lease", epoch=self.lease.epoch)
        else:
            self.writer.close(timeout=10.0)
        self.lease.stop()


def _norm_state(norm: ObsNorm | None) -> dict:
    """Checkpoint counters of the observation statistics (none without `env.normalize_obs`)."""
    return {} if norm is None else {"obs_norm": norm.state()}


def _state_counters(epoch: int, c: dict, sampler: SampleClient, rank_states: list[bytes]) -> dict:
    """Counters a restored learner continues from (the replay rate limiter lives in the shard).

    `rank_states`: each rank's sampler state (JSON bytes, gathered at this step) when the
    learner trains in a group; a restored group hands entry r back to rank r.
    """
    state = {
        "epoch": epoch,
        "versions_published_total": c["versions_published_total"],
        "replay_not_ready_total": sampler.not_ready_total,
        "sample_wait_seconds_total": c["sample_wait_seconds_total"],
        "sampler": sampler_state(sampler),
    }
    if rank_states:
        state["ranks"] = [json.loads(b) for b in rank_states]
    return state


def _run_started(r: redis.Redis, keys: Keys, store: CheckpointStore) -> bool:
    """A primary took the lease before: the epoch counter exists, or (the root shard came
    back without its data) some shard still holds a committed checkpoint."""
    with contextlib.suppress(redis.RedisError):
        return bool(r.exists(keys.epoch)) or bool(store.committed())
    return False
