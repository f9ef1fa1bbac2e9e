"""`canopy learner --id N [--standby]`: sample from replay, train, publish, checkpoint.

build (env spaces, network, algorithm, Redis shard clients: everything a warm standby
keeps ready, plus the newest checkpoint, prefetched while it waits) -> lease (wait until
no other learner holds it; take a new epoch) -> restore (newest checkpoint with every
chunk valid on some shard) -> run (next batch, update, publish every `publish_every`
updates, capture a checkpoint every `checkpoint.every_s` for the background writer) ->
report (stats hash, events).
A learner that loses its lease stops: it can neither publish nor commit (fencing).
"""

from __future__ import annotations

import contextlib
import math
import threading
import time

import redis
import torch

from actors.envs import env_spec
from cache.codecs import Encoder
from cluster.config import Config, to_dict
from cluster.errors import DeadlineExceeded, ProtocolError
from cluster.keys import Keys
from cluster.redisconn import connect
from cluster.telemetry import Telemetry
from cluster.version import Version
from learner import algorithms
from learner.algorithms.dqn import Batch
from learner.checkpoint.lease import Fenced, Lease
from learner.checkpoint.placement import make_plan, shard_hosts_of
from learner.checkpoint.prefetch import Prefetcher
from learner.checkpoint.state import Capturer, load_sampler_state, restore, sampler_state
from learner.checkpoint.store import CheckpointStore
from learner.checkpoint.writer import Writer
from learner.priorities import PriorityReturn
from learner.publisher import Publisher
from replay.client import SampleClient, TensorBatch
from replay.membership import RedisMembers

SAMPLE_TIMEOUT_S = 120.0


def pick_device(choice: str) -> torch.device:
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def make_store(cfg: Config, ident: int) -> CheckpointStore:
    """The checkpoint store over every Redis shard, with this learner's placement plan."""
    ck = cfg.checkpoint
    clients = [connect(cfg.cluster, "learner", ident, shard=i) for i in range(len(cfg.cluster.redis))]
    hosts = shard_hosts_of(ck.shard_hosts, cfg.cluster.redis)
    plan = make_plan(hosts, ck.replicas, ck.learner_host, ident, ck.placement)
    return CheckpointStore(
        clients, Keys(cfg.run.name), plan, ck.chunk_mb << 20, ck.keep, ck.rate_mb_s * 2**20
    )


def run(cfg: Config, ident: int, stop: threading.Event, standby: bool = False) -> None:
    lc, ck = cfg.learner, cfg.checkpoint
    keys = Keys(cfg.run.name)
    r = connect(cfg.cluster, "learner", ident)
    tel = Telemetry(r, keys, "learner", ident, cfg.run.heartbeat_s, commands=("checkpoint",))
    tel.start()

    # Build everything before asking for the lease: a standby waits here warm.
    torch.manual_seed(cfg.run.seed)
    device = pick_device(lc.device)
    if device.type == "cpu":
        torch.set_num_threads(lc.threads)
    algo, arch = algorithms.make(env_spec(cfg.env.id, cfg.env), lc, device)
    store = make_store(cfg, ident)
    lease = Lease(r, keys, ident, ck.lease_ttl_s, epoch_floor=lambda: _newest_epoch(store))
    if standby or lease.holder() is not None:
        tel.set_state("standby")
    # A standby keeps the newest checkpoint read and verified while it waits (warm state).
    prefetch = Prefetcher(store) if ck.enabled and (standby or lease.holder() is not None) else None
    try:
        if standby:
            # A standby only takes over: it leaves a fresh run's first lease to the primary.
            while not _run_started(r, keys, store) and not stop.wait(0.05):
                pass
        lease.acquire(timeout=None, stop=stop)
    except DeadlineExceeded:
        if prefetch is not None:
            prefetch.take(timeout=1.0)
        tel.close()
        return
    t_lease = time.monotonic()
    if standby:
        tel.event("failover", epoch=lease.epoch)
    lease.start_renewing(on_lost=stop.set)

    parent = "-"
    counters: dict = {}
    if ck.enabled:
        loaded = prefetch.take() if prefetch is not None else None
        prefetched = loaded is not None
        if loaded is None:
            loaded = store.recover()
        if loaded is not None:
            counters = restore(algo, loaded.snapshot)
            parent = loaded.ckpt
            tel.event(
                "restore",
                ckpt=loaded.ckpt,
                epoch=lease.epoch,
                seconds=round(time.monotonic() - t_lease, 3),
                prefetched=int(prefetched),
                bad_replicas=len(loaded.bad_replicas),
                skipped=len(loaded.skipped),
                detail="; ".join((loaded.skipped + loaded.bad_replicas)[:5])[:500],
            )
    encoder = Encoder(cfg.cache.codec, cfg.cache.codec_levels, cfg.cache.keyframe_every)
    publisher = Publisher(r, keys, ident, lc.keep_versions, lease=lease, encoder=encoder)
    # The lease's local deadline guards every commit, and every publish below.
    writer = Writer(
        store,
        ident,
        tel.event,
        on_fenced=stop.set,
        guard=lease.check,
        token=lease.token,
        repair_every_s=ck.repair_every_s if ck.enabled else 0.0,
    )
    capturer = Capturer(pin=device.type == "cuda")
    rc = cfg.replay
    prioritized = rc.sampler == "prioritized"
    # Every live replay shard, following membership in Redis as shards come and go.
    members = RedisMembers(r, keys, rc.member_ttl_s / 3, fallback=cfg.cluster.replay)
    sampler = SampleClient(
        members,
        lc.batch_size,
        lc.samples_in_flight,
        rc.max_frame_mb * 2**20,
        is_exponent=rc.importance_exponent,
        is_exponent_final=rc.importance_exponent_final,
        anneal_batches=rc.importance_anneal_updates,
        seed=cfg.run.seed * 1000 + ident,
    )
    if "sampler" in counters:
        try:
            load_sampler_state(sampler, counters["sampler"])  # the next batch is drawn as before the stop
        except ProtocolError as exc:  # trains on with a fresh draw order rather than not at all
            tel.event("rejected_input", what="checkpoint sampler state", message=str(exc)[:300])
    priorities = PriorityReturn(sampler, device)
    c = tel.counters
    c.update(
        updates_total=algo.updates,
        versions_published_total=int(counters.get("versions_published_total", 0)),
        epoch=lease.epoch,
        loss=0.0,
        q_mean=0.0,
        sample_wait_seconds_total=0.0,
        policy_lag_mean=0.0,
        checkpoints_total=0,
        checkpoint_stall_ms_last=0.0,
        checkpoint=parent,
    )
    version = None
    try:
        lease.check()
        version = publisher.publish(algo.export(), step=algo.updates, arch=arch, checkpoint=parent)
        c["versions_published_total"] += 1
        c["policy_version"] = str(version)
        tel.set_state("running")
        tel.event("start", epoch=lease.epoch, device=str(device), version=str(version), checkpoint=parent)
        period = ck.every_s if ck.every_s > 0 else math.inf  # 0: only on demand
        next_ckpt = time.monotonic() + period
        deferred = False
        # On `device` (zero-copy on CPU); the iterator ends as soon as `stop` is set.
        batches = sampler.tensor_batches(device, SAMPLE_TIMEOUT_S, stop)
        while not stop.is_set():
            t0 = time.monotonic()
            batch = next(batches, None)
            if batch is None:
                break
            arrays = batch.arrays
            c["sample_wait_seconds_total"] += time.monotonic() - t0
            stats = algo.update(_to_batch(batch, prioritized))
            if prioritized:
                # New priorities go back fire-and-forget; the shard drops any for slots
                # overwritten since (their generation moved on).
                priorities.push(algo.last_td_error, arrays["shard"][0], arrays["slot"], arrays["gen"])
            c["updates_total"] = algo.updates
            if algo.updates % 50 == 0:
                c.update(loss=stats["loss"].item(), q_mean=stats["q_mean"].item())  # the only host syncs
                # How old the data is, in learner steps (only comparable within one epoch).
                data_steps = arrays["version"] & 0xFFFFFFFF
                c["policy_lag_mean"] = float(version.step - data_steps.mean())
                c["replay_shards"] = len(sampler.shards)
            if algo.updates % lc.publish_every == 0:
                lineage = writer.last_committed or parent
                lease.check()  # no round trip: a learner resumed past its TTL stops here
                version = publisher.publish(algo.export(), step=algo.updates, arch=arch, checkpoint=lineage)
                c["versions_published_total"] += 1
                c["policy_version"] = str(version)
            if not tel.commands.empty() and tel.commands.get() == "checkpoint":
                next_ckpt = 0.0  # operator: RPUSH control:learner:<id> checkpoint
            if ck.enabled and time.monotonic() >= next_ckpt:
                if writer.busy():
                    # Do not queue behind a slow write: keep it due and take the newest
                    # state once the writer is free (every due checkpoint coalesces into one).
                    if not deferred:
                        tel.event("checkpoint_deferred", reason="previous checkpoint still writing")
                        deferred = True
                    continue
                t1 = time.monotonic()
                snap = capturer.capture(algo, _state_counters(lease.epoch, c, sampler), to_dict(cfg))
                stall_ms = (time.monotonic() - t1) * 1000
                writer.submit(snap, f"{lease.epoch}.{algo.updates}", lease.token, stall_ms=round(stall_ms, 2))
                c["checkpoint_stall_ms_last"] = stall_ms
                c["checkpoints_total"] = writer.commits
                next_ckpt = time.monotonic() + period
                deferred = False
    except Fenced as exc:
        tel.event("fence", what="publish", message=str(exc))
    except redis.ConnectionError as exc:
        # The root shard is gone, and the lease with it: stop rather than crash; the launcher
        # brings the root back and a standby takes over under a newer epoch.
        tel.event("fence", what="root", message=str(exc)[:300])
    finally:
        if lease.lost.is_set():
            tel.event("fence", what="lease", epoch=lease.epoch)
        else:
            writer.close(timeout=10.0)
        lease.stop()
        priorities.flush()
        sampler.close()
        members.close()
        tel.event("stop", updates=algo.updates, version=str(version))
        tel.close("fenced" if lease.lost.is_set() else "stopped")


def _state_counters(epoch: int, c: dict, sampler: SampleClient) -> dict:
    """Counters a restored learner continues from (the replay rate limiter lives in the shard)."""
    return {
        "epoch": epoch,
        "versions_published_total": c["versions_published_total"],
        "replay_not_ready_total": sampler.not_ready_total,
        "sample_wait_seconds_total": c["sample_wait_seconds_total"],
        "sampler": sampler_state(sampler),
    }


def _newest_epoch(store: CheckpointStore) -> int:
    """The newest epoch any committed checkpoint on any shard names: the next epoch's floor."""
    return max((Version.parse(ckpt).epoch for ckpt in store.committed()), default=0)


def _run_started(r: redis.Redis, keys: Keys, store: CheckpointStore) -> bool:
    """A primary took the lease before: the epoch counter exists, or (the root shard came
    back without its data) some shard still holds a committed checkpoint."""
    with contextlib.suppress(redis.RedisError):
        return bool(r.exists(keys.epoch)) or bool(store.committed())
    return False


def _to_batch(batch: TensorBatch, weighted: bool) -> Batch:
    t = batch.tensors
    weight = t["weight"] if weighted else None
    return Batch(t["obs"], t["action"], t["reward"], t["next_obs"], t["discount"], weight)
