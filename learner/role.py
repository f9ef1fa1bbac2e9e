"""`canopy learner --id N [--standby]`: sample from replay, train, publish, checkpoint.

build (env spaces, network, algorithm, Redis shard clients: everything a warm standby
keeps ready, plus the newest checkpoint, prefetched while it waits) -> lease (wait until
no other learner holds it; take a new epoch) -> restore (newest checkpoint with every
chunk valid on some shard) -> run (next batch, update, publish every `publish_every`
updates, capture a checkpoint every `checkpoint.every_s` for the background writer) ->
report (stats hash, events).
A learner that loses its lease stops: it can neither publish nor commit (fencing).

Data parallel (`learner.learners = N > 1`, learner/group.py): the lease holder is rank 0
of a group of N processes; learner ids 1..N-1 are followers (rank = id) that skip the
lease, publishing and checkpoint writes. After restore, rank 0 forms the group and
broadcasts its whole training state, so every rank starts identical; then every update
is: one control all-reduce (stop / checkpoint flags), each rank its own batch from the
replay shards, gradients averaged across ranks (learner/overlap.py) before clipping and
the optimizer step. Only rank 0 publishes; its checkpoints hold the shared model and
optimizer state plus every rank's sampler state (gathered at the checkpoint's step).

A population (`learner.models = M > 1`, learner/population.py): every update takes M
batches, one per model; in a group the models' all-reduces overlap their backward passes.
One published version holds all M models.
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
import time
from collections.abc import Iterator

import redis
import torch

from actors.envs import env_spec
from cache.codecs import Encoder
from cluster.config import Config, to_dict
from cluster.errors import DeadlineExceeded, ProtocolError
from cluster.hostplan import follower_rank
from cluster.keys import Keys
from cluster.redisconn import connect
from cluster.telemetry import Telemetry
from cluster.version import Version
from learner import algorithms
from learner.algorithms.dqn import DQN, Batch
from learner.algorithms.td3 import TD3
from learner.checkpoint.lease import Fenced, Lease
from learner.checkpoint.placement import make_plan, shard_hosts_of
from learner.checkpoint.prefetch import Prefetcher
from learner.checkpoint.state import Capturer, Snapshot, load_sampler_state, restore, sampler_state
from learner.checkpoint.store import CheckpointStore
from learner.checkpoint.writer import Writer
from learner.group import LearnerGroup, params_digest
from learner.obsnorm import ObsNorm
from learner.overlap import GradSync, GroupLost
from learner.population import Population
from learner.priorities import PriorityReturn
from learner.publisher import Publisher
from replay.client import SampleClient, TensorBatch
from replay.membership import RedisMembers

SAMPLE_TIMEOUT_S = 120.0
# A rank silent this long (stuck, paused) ends the group; longer than a sample wait.
GROUP_TIMEOUT_S = SAMPLE_TIMEOUT_S + 60.0
# Stats every rank's training loop (_train) keeps up to date, as they read before the first update.
TRAINING_STATS = {"loss": 0.0, "q_mean": 0.0, "sample_wait_seconds_total": 0.0, "policy_lag_mean": 0.0}


def pick_device(choice: str, rank: int | None = None) -> torch.device:
    """The torch device; with CUDA, rank r of a learner group takes GPU r % device_count."""
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and rank is not None and torch.cuda.is_available():
        return torch.device("cuda", rank % torch.cuda.device_count())
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
    rank = follower_rank(lc.learners, ident)
    if rank is not None:
        follow(cfg, ident, rank, stop)
        return
    keys = Keys(cfg.run.name)
    r = connect(cfg.cluster, "learner", ident)
    tel = Telemetry(r, keys, "learner", ident, cfg.run.heartbeat_s, commands=("checkpoint",))
    tel.start()

    # Build everything before asking for the lease: a standby waits here warm.
    torch.manual_seed(cfg.run.seed)
    device = pick_device(lc.device, 0 if lc.learners > 1 else None)
    if device.type == "cpu":
        torch.set_num_threads(lc.threads)
    spec = env_spec(cfg.env.id, cfg.env)
    algo, arch = algorithms.make(spec, lc, device)
    norm = ObsNorm.for_learner(cfg.env, spec, arch, device)  # None unless env.normalize_obs
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
            _load_norm(norm, counters, tel)
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
    prioritized = cfg.replay.sampler == "prioritized"
    members, sampler = _sample_client(cfg, r, keys, ident)
    if "sampler" in counters:
        _load_sampler(sampler, counters["sampler"], tel)  # the next batch is drawn as before the stop
    priorities = PriorityReturn(sampler, device)
    c = tel.counters
    c.update(
        updates_total=algo.updates,
        versions_published_total=int(counters.get("versions_published_total", 0)),
        epoch=lease.epoch,
        **TRAINING_STATS,
        checkpoints_total=0,
        checkpoint_stall_ms_last=0.0,
        checkpoint=parent,
    )
    version = None
    group: LearnerGroup | None = None
    try:
        if lc.learners > 1:
            group = LearnerGroup.form(
                r, keys, lease.epoch, cfg.cluster.learner_store, lc.learners, device, stop, GROUP_TIMEOUT_S
            )
            # Every rank starts from this rank's state (restored or fresh) and its RNGs; each
            # follower finds its own sampler state under `ranks` (none on a fresh start).
            snap = capturer.capture(algo, {"ranks": counters.get("ranks", []), **_norm_state(norm)}, {})
            group.broadcast_bytes(snap.meta_bytes())
            group.broadcast_bytes(snap.flat.numpy().tobytes())
            _join_gradients(algo)
            c["rank"] = 0
        lease.check()
        version = publisher.publish(_export(algo, norm), step=algo.updates, arch=arch, checkpoint=parent)
        c["versions_published_total"] += 1
        c["policy_version"] = str(version)
        tel.set_state("running")
        tel.event("start", epoch=lease.epoch, device=str(device), version=str(version), checkpoint=parent)
        period = ck.every_s if ck.every_s > 0 else math.inf  # 0: only on demand
        next_ckpt = time.monotonic() + period
        deferred = False
        # On `device` (zero-copy on CPU); the iterator ends as soon as `stop` is set.
        batches = sampler.tensor_batches(device, SAMPLE_TIMEOUT_S, stop)
        while True:
            t0 = time.monotonic()
            batch = None if stop.is_set() else _take(batches, lc.models)
            if not tel.commands.empty() and tel.commands.get() == "checkpoint":
                next_ckpt = 0.0  # operator: RPUSH control:learner:<id> checkpoint
            checkpoint_now = ck.enabled and time.monotonic() >= next_ckpt
            if checkpoint_now and writer.busy():
                # Do not queue behind a slow write: keep it due and take the newest state
                # once the writer is free (every due checkpoint coalesces into one).
                if not deferred:
                    tel.event("checkpoint_deferred", reason="previous checkpoint still writing")
                    deferred = True
                checkpoint_now = False
            rank_states: list[bytes] = []
            if group is not None:
                halt, checkpoint_now = group.control(batch is None, checkpoint_now)
                if halt:
                    break
                if checkpoint_now:
                    rank_states = group.gather_bytes(json.dumps(sampler_state(sampler)).encode())
            elif batch is None:
                break
            _train(algo, batch, prioritized, priorities, c, sampler, version, t0, group is not None, norm)
            if algo.updates % lc.publish_every == 0:
                lineage = writer.last_committed or parent
                lease.check()  # no round trip: a learner resumed past its TTL stops here
                version = publisher.publish(
                    _export(algo, norm), step=algo.updates, arch=arch, checkpoint=lineage
                )
                c["versions_published_total"] += 1
                c["policy_version"] = str(version)
            if checkpoint_now:
                t1 = time.monotonic()
                state = {**_state_counters(lease.epoch, c, sampler, rank_states), **_norm_state(norm)}
                snap = capturer.capture(algo, state, to_dict(cfg))
                stall_ms = (time.monotonic() - t1) * 1000
                writer.submit(snap, f"{lease.epoch}.{algo.updates}", lease.token, stall_ms=round(stall_ms, 2))
                c["checkpoint_stall_ms_last"] = stall_ms
                c["checkpoints_total"] = writer.commits
                next_ckpt = time.monotonic() + period
                deferred = False
    except Fenced as exc:
        tel.event("fence", what="publish", message=str(exc))
    except GroupLost as exc:
        # A rank died or went silent: the group ends with this epoch (learner/group.py).
        tel.event("group_lost", epoch=lease.epoch, message=str(exc)[:300])
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
        extra = {"rank": 0, "digest": params_digest(algo.online)} if group is not None else {}
        if group is not None:
            group.close()
        tel.event("stop", updates=algo.updates, version=str(version), **extra)
        tel.close("fenced" if lease.lost.is_set() else "stopped")


def follow(cfg: Config, ident: int, rank: int, stop: threading.Event) -> None:
    """A follower of the learner group: rank `rank`, trains in step with rank 0, never publishes.

    build -> join (wait for the current epoch's group) -> take rank 0's state -> run (the
    same loop as rank 0 without publish and checkpoint writes) -> report. It stops when any
    rank stops; `canopy up` starts it again for the next group.
    """
    lc = cfg.learner
    keys = Keys(cfg.run.name)
    r = connect(cfg.cluster, "learner", ident)
    tel = Telemetry(r, keys, "learner", ident, cfg.run.heartbeat_s)
    tel.start()
    tel.set_state("joining")
    torch.manual_seed(cfg.run.seed)
    device = pick_device(lc.device, rank)
    if device.type == "cpu":
        torch.set_num_threads(lc.threads)
    spec = env_spec(cfg.env.id, cfg.env)
    algo, arch = algorithms.make(spec, lc, device)
    norm = ObsNorm.for_learner(cfg.env, spec, arch, device)
    try:
        group = LearnerGroup.join(r, keys, rank, lc.learners, device, stop, GROUP_TIMEOUT_S)
    except GroupLost:
        tel.close()
        return
    prioritized = cfg.replay.sampler == "prioritized"
    members, sampler = _sample_client(cfg, r, keys, ident)
    priorities = PriorityReturn(sampler, device)
    c = tel.counters
    c.update(
        rank=rank,
        epoch=group.epoch,
        updates_total=0,
        versions_published_total=0,
        **TRAINING_STATS,
    )
    try:
        meta = group.broadcast_bytes(None)
        counters = restore(algo, Snapshot.from_bytes(meta, group.broadcast_bytes(None)))
        _load_norm(norm, counters, tel)
        ranks = counters.get("ranks") or []
        if rank < len(ranks):
            _load_sampler(sampler, ranks[rank], tel)
        _join_gradients(algo)
        c["updates_total"] = algo.updates
        tel.set_state("running")
        tel.event("start", epoch=group.epoch, rank=rank, device=str(device), updates=algo.updates)
        batches = sampler.tensor_batches(device, SAMPLE_TIMEOUT_S, stop)
        while True:
            t0 = time.monotonic()
            batch = None if stop.is_set() else _take(batches, lc.models)
            halt, checkpoint_now = group.control(batch is None, False)
            if halt:
                break
            if checkpoint_now:  # rank 0 checkpoints at this step: it keeps our sampler state
                group.gather_bytes(json.dumps(sampler_state(sampler)).encode())
            _train(algo, batch, prioritized, priorities, c, sampler, None, t0, True, norm)
    except GroupLost as exc:
        tel.event("group_lost", epoch=group.epoch, rank=rank, message=str(exc)[:300])
    finally:
        priorities.flush()
        sampler.close()
        members.close()
        group.close()
        tel.event("stop", updates=algo.updates, rank=rank, digest=params_digest(algo.online))
        tel.close()


def _train(
    algo: DQN | TD3 | Population,
    batches: list[TensorBatch],
    prioritized: bool,
    priorities: PriorityReturn,
    c: dict,
    sampler: SampleClient,
    version: Version | None,
    t0: float,
    digest: bool,
    norm: ObsNorm | None = None,
) -> None:
    """One update on `batches` (one per model) and the counters that follow it (every rank alike)."""
    c["sample_wait_seconds_total"] += time.monotonic() - t0
    if isinstance(algo, Population):
        stats = algo.update([_to_batch(b, prioritized, norm) for b in batches])
        td_errors = algo.last_td_error
    else:
        stats = algo.update(_to_batch(batches[0], prioritized, norm))
        td_errors = [algo.last_td_error]
    if prioritized:
        # New priorities go back fire-and-forget; the shard drops any for slots
        # overwritten since (their generation moved on).
        for batch, td_error in zip(batches, td_errors, strict=True):
            arrays = batch.arrays
            priorities.push(td_error, arrays["shard"][0], arrays["slot"], arrays["gen"])
    c["updates_total"] = algo.updates
    if algo.updates % 50 == 0:
        c.update(loss=stats["loss"].item(), q_mean=stats["q_mean"].item())  # the only host syncs
        if "losses" in stats:
            c["model_losses"] = " ".join(f"{x:.4g}" for x in stats["losses"].tolist())
        if version is not None:
            # How old the data is, in learner steps (only comparable within one epoch).
            data_steps = batches[0].arrays["version"] & 0xFFFFFFFF
            c["policy_lag_mean"] = float(version.step - data_steps.mean())
        c["replay_shards"] = len(sampler.shards)
        if digest:
            # Every rank of a group reports the same digest at the same update count.
            c["params_digest"] = f"{algo.updates}:{params_digest(algo.online)}"


def _take(batches: Iterator[TensorBatch], n: int) -> list[TensorBatch] | None:
    """The next `n` batches (one per model of a population), or None once the sampler stops."""
    out = []
    for _ in range(n):
        batch = next(batches, None)
        if batch is None:
            return None
        out.append(batch)
    return out


def _join_gradients(algo: DQN | TD3 | Population) -> None:
    """Average gradients over the (now formed) group from the next update on.

    A population's OverlapTrainer reduces over the group by itself, one model's all-reduce
    overlapping the next one's backward pass; a single model reduces through its hook.
    """
    if not isinstance(algo, Population):
        algo.grad_sync = GradSync()


def _sample_client(cfg: Config, r: redis.Redis, keys: Keys, ident: int) -> tuple[RedisMembers, SampleClient]:
    """This learner's replay sample client (its own draw order: seeded by its id)."""
    rc, lc = cfg.replay, cfg.learner
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
    return members, sampler


def _load_sampler(sampler: SampleClient, state: object, tel: Telemetry) -> None:
    try:
        load_sampler_state(sampler, state)
    except ProtocolError as exc:  # trains on with a fresh draw order rather than not at all
        tel.event("rejected_input", what="checkpoint sampler state", message=str(exc)[:300])


def _export(algo: DQN | TD3 | Population, norm: ObsNorm | None) -> dict:
    """The arrays to publish: with `env.normalize_obs`, the normalization folded in front."""
    return algo.export() if norm is None else norm.fold(algo.export())


def _norm_state(norm: ObsNorm | None) -> dict:
    """Checkpoint counters of the observation statistics (none without `env.normalize_obs`)."""
    return {} if norm is None else {"obs_norm": norm.state()}


def _load_norm(norm: ObsNorm | None, counters: dict, tel: Telemetry) -> None:
    if norm is None or "obs_norm" not in counters:
        return
    try:
        norm.load(counters["obs_norm"])
    except ProtocolError as exc:  # trains on with fresh statistics rather than not at all
        tel.event("rejected_input", what="checkpoint obs_norm state", message=str(exc)[:300])


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


def _newest_epoch(store: CheckpointStore) -> int:
    """The newest epoch any committed checkpoint on any shard names: the next epoch's floor."""
    return max((Version.parse(ckpt).epoch for ckpt in store.committed()), default=0)


def _run_started(r: redis.Redis, keys: Keys, store: CheckpointStore) -> bool:
    """A primary took the lease before: the epoch counter exists, or (the root shard came
    back without its data) some shard still holds a committed checkpoint."""
    with contextlib.suppress(redis.RedisError):
        return bool(r.exists(keys.epoch)) or bool(store.committed())
    return False


def _to_batch(batch: TensorBatch, weighted: bool, norm: ObsNorm | None = None) -> Batch:
    t = batch.tensors
    weight = t["weight"] if weighted else None
    obs, next_obs = t["obs"], t["next_obs"]
    if norm is not None:  # env.normalize_obs: statistics of the observations trained on
        norm.update(obs)
        obs, next_obs = norm.normalize(obs), norm.normalize(next_obs)
    return Batch(obs, t["action"], t["reward"], next_obs, t["discount"], weight)
