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

A population (`learner.models = M > 1`, learner/algorithms/population.py): every update takes M
batches, one per model; in a group the models' all-reduces overlap their backward passes.
One published version holds all M models.

The algorithm is only an `Algorithm` here (learner/algorithms/base.py: update, priorities,
export, state/restore, join_group), built by `algorithms.make`. One training loop
(`_Trainer.run`) serves the lease holder and its followers alike; what only the lease
holder does (lease, publish, checkpoint) is `Lead` in learner/lead.py.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import numpy as np
import redis

from canopy.config import Config, on_policy
from canopy.config_defaults import UNROLLS
from canopy.errors import ProtocolError
from canopy.keys import Keys
from canopy.learner.algorithms import Batch, Stats, Unrolls, host_stats
from canopy.learner.checkpoint.prefetch import Prefetcher
from canopy.learner.checkpoint.state import Snapshot, load_sampler_state, restore, sampler_state
from canopy.learner.checkpoint.store import CheckpointStore
from canopy.learner.group import LearnerGroup, params_digest
from canopy.learner.lead import Lead, make_store, take_lease
from canopy.learner.metrics import MetricsWriter
from canopy.learner.model import Model
from canopy.learner.obsnorm import ObsNorm
from canopy.learner.overlap import GroupLost
from canopy.learner.priorities import PriorityReturn
from canopy.lease import Fenced, Lease, follower_rank
from canopy.redisconn import connect
from canopy.replay.client import SampleClient, TensorBatch
from canopy.replay.membership import RedisMembers
from canopy.replay.sample import TRAIN_FIELDS
from canopy.telemetry import Telemetry
from canopy.version import Version

SAMPLE_TIMEOUT_S = 120.0
# A rank silent this long (stuck, paused) ends the group; longer than a sample wait.
GROUP_TIMEOUT_S = SAMPLE_TIMEOUT_S + 60.0
# Stats every rank's training loop (_Trainer) keeps up to date, as they read before the first update.
TRAINING_STATS = {"loss": 0.0, "q_mean": 0.0, "sample_wait_seconds_total": 0.0, "policy_lag_mean": 0.0}
# The columns of an unroll (actors/unroll.py) an on-policy learner trains on.
UNROLL_FIELDS = ("obs", "action", "reward", "terminated", "truncated", "mask", "logp", "version")
LAG_BINS = 64  # policy lag histogram: 0 .. LAG_BINS - 1 versions, the last bin holding the rest


def run(cfg: Config, ident: int, stop: threading.Event, standby: bool = False) -> None:
    """The lease holder (or its warm standby) until `stop`; a group's followers go to `follow`."""
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
    model = Model.build(cfg, 0 if lc.learners > 1 else None)
    store = make_store(cfg, ident)
    lease = Lease(r, keys, ident, ck.lease_ttl_s, epoch_floor=lambda: _newest_epoch(store))
    took = take_lease(lease, r, keys, store, tel, stop, standby, ck.enabled)
    if took is None:
        tel.close()
        return
    prefetch, t_lease = took
    counters, parent = _restore_newest(ck.enabled, store, prefetch, model, lease.epoch, t_lease, tel)
    lead = Lead(cfg, ident, r, keys, tel, lease, store, model, parent, stop)
    trainer = _Trainer(model, cfg, _sample_client(cfg, r, keys, ident), tel.counters)
    if "sampler" in counters:
        _load_sampler(trainer.sampler, counters["sampler"], tel)  # the next batch is drawn as before the stop
    c = tel.counters
    c.update(
        updates_total=model.algo.updates,
        versions_published_total=int(counters.get("versions_published_total", 0)),
        epoch=lease.epoch,
        **TRAINING_STATS,
        checkpoints_total=0,
        checkpoint_stall_ms_last=0.0,
        checkpoint=parent,
    )
    group: LearnerGroup | None = None
    metrics = MetricsWriter(r, keys, cfg, c)  # the run's metrics stream, from the lease holder only
    metrics.start()
    try:
        if lc.learners > 1:
            group = LearnerGroup.form(
                r,
                keys,
                lease.epoch,
                cfg.cluster.learner_store,
                lc.learners,
                model.device,
                stop,
                GROUP_TIMEOUT_S,
            )
            lead.share_state(group, counters.get("ranks", []))
            model.algo.join_group()
            c["rank"] = 0
        lead.publish(parent)
        tel.set_state("running")
        tel.event(
            "start", epoch=lease.epoch, device=str(model.device), version=str(lead.version), checkpoint=parent
        )
        lead.start_clock()
        trainer.run(stop, group, lead)
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
        metrics.close()
        lead.close()
        trainer.close()
        extra = {"rank": 0, "digest": params_digest(model.algo.online)} if group is not None else {}
        if group is not None:
            group.close()
        tel.event("stop", updates=model.algo.updates, version=str(lead.version), **extra)
        tel.close("fenced" if lease.lost.is_set() else "stopped")


def follow(cfg: Config, ident: int, rank: int, stop: threading.Event) -> None:
    """A follower of the learner group: rank `rank`, trains in step with rank 0, never publishes.

    build -> join (wait for the current epoch's group) -> take rank 0's state -> run (the
    same loop as rank 0 without publish and checkpoint writes) -> report. It stops when any
    rank stops; `canopy up` starts it again for the next group.
    """
    keys = Keys(cfg.run.name)
    r = connect(cfg.cluster, "learner", ident)
    tel = Telemetry(r, keys, "learner", ident, cfg.run.heartbeat_s)
    tel.start()
    tel.set_state("joining")
    model = Model.build(cfg, rank)
    algo = model.algo
    try:
        group = LearnerGroup.join(r, keys, rank, cfg.learner.learners, model.device, stop, GROUP_TIMEOUT_S)
    except GroupLost:
        tel.close()
        return
    trainer = _Trainer(model, cfg, _sample_client(cfg, r, keys, ident), tel.counters)
    c = tel.counters
    c.update(rank=rank, epoch=group.epoch, updates_total=0, versions_published_total=0, **TRAINING_STATS)
    try:
        meta = group.broadcast_bytes(None)
        counters = restore(algo, Snapshot.from_bytes(meta, group.broadcast_bytes(None)))
        _load_norm(model.norm, counters, tel)
        ranks = counters.get("ranks") or []
        if rank < len(ranks):
            _load_sampler(trainer.sampler, ranks[rank], tel)
        algo.join_group()
        c["updates_total"] = algo.updates
        tel.set_state("running")
        tel.event("start", epoch=group.epoch, rank=rank, device=str(model.device), updates=algo.updates)
        trainer.run(stop, group, None)
    except GroupLost as exc:
        tel.event("group_lost", epoch=group.epoch, rank=rank, message=str(exc)[:300])
    finally:
        trainer.close()
        group.close()
        tel.event("stop", updates=algo.updates, rank=rank, digest=params_digest(algo.online))
        tel.close()


class _Trainer:
    """One rank's training loop, the same for the lease holder and every follower of its
    group: next batch(es), one control step with the group, update, priorities back to
    replay, counters; then what only the lease holder does (`Lead`, learner/lead.py)."""

    def __init__(self, model: Model, cfg: Config, sampling: tuple[RedisMembers, SampleClient], c: dict):
        self.model, self.algo, self.c = model, model.algo, c
        self.prioritized = cfg.replay.sampler == "prioritized"
        self.fields = UNROLL_FIELDS if on_policy(cfg) else TRAIN_FIELDS
        self.members, self.sampler = sampling  # `_sample_client`
        self.priorities = PriorityReturn(self.sampler, model.device)
        # Policy lag of every item trained on (an unroll: its first step), in versions.
        self.lag_counts = np.zeros(LAG_BINS, np.int64)

    def run(self, stop: threading.Event, group: LearnerGroup | None, lead: Lead | None) -> None:
        """Train until `stop` or the sampler ends; in a group, until any rank stops."""
        # On the device (zero-copy on CPU); the iterator ends as soon as `stop` is set.
        batches = self.sampler.tensor_batches(self.model.device, SAMPLE_TIMEOUT_S, stop, self.fields)
        while True:
            t0 = time.monotonic()
            batch = None if stop.is_set() else _take(batches, self.algo.models)
            checkpoint_now = lead is not None and lead.checkpoint_due()
            rank_states: list[bytes] = []
            if group is not None:
                # Only rank 0's checkpoint request counts; every rank learns of it here.
                halt, checkpoint_now = group.control(batch is None, checkpoint_now)
                if halt:
                    break
                if checkpoint_now:  # rank 0 checkpoints at this step and keeps every rank's sampler state
                    rank_states = group.gather_bytes(json.dumps(sampler_state(self.sampler)).encode())
            elif batch is None:
                break
            self.step(batch, None if lead is None else lead.version, t0, digest=group is not None)
            if lead is not None:
                lead.after_update(checkpoint_now, self.sampler, rank_states)

    def step(self, batches: list[TensorBatch], version: Version | None, t0: float, digest: bool) -> None:
        """One update on `batches` (one per model) and the counters that follow it (every rank alike)."""
        algo, c = self.algo, self.c
        c["sample_wait_seconds_total"] += time.monotonic() - t0
        inputs = [_to_batch(b, self.prioritized, self.model.norm) for b in batches]
        stats = algo.update(inputs[0] if algo.models == 1 else inputs)
        if self.prioritized:
            self._return_priorities(batches)
        c["updates_total"] = algo.updates
        if version is not None:
            self._count_lag(batches, version)
        if algo.updates % algo.report_every == 0:
            self._report(stats, batches, version, digest)

    def _count_lag(self, batches: list[TensorBatch], version: Version) -> None:
        """Add each item's policy lag (the learner's step minus the step of the version that
        acted; only comparable within one epoch) to the histogram."""
        for batch in batches:
            acted = batch.arrays["version"]
            acted = acted[:, 0] if acted.ndim == 2 else acted  # an unroll: its first step
            lag = np.clip(version.step - (acted & 0xFFFFFFFF), 0, LAG_BINS - 1)
            self.lag_counts += np.bincount(lag, minlength=LAG_BINS)

    def _return_priorities(self, batches: list[TensorBatch]) -> None:
        """New priorities go back fire-and-forget; the shard drops any for slots overwritten
        since (their generation moved on)."""
        new = self.algo.priorities()
        if new is None:  # an algorithm without priorities: the actors' initial ones stay
            return
        for batch, td_error in zip(batches, new, strict=True):
            arrays = batch.arrays
            self.priorities.push(td_error, arrays["shard"][0], arrays["slot"], arrays["gen"])

    def _report(
        self, stats: Stats, batches: list[TensorBatch], version: Version | None, digest: bool
    ) -> None:
        c = self.c
        values = host_stats(stats)  # the only host sync
        c.update({k: v for k, v in values.items() if "/" not in k})
        losses = [v for k, v in values.items() if k.endswith("/loss")]  # a population's, model by model
        if losses:
            c["model_losses"] = " ".join(f"{x:.4g}" for x in losses)
        if version is not None:
            # How old the data is, in learner steps (only comparable within one epoch).
            data_steps = batches[0].arrays["version"] & 0xFFFFFFFF
            c["policy_lag_mean"] = float(version.step - data_steps.mean())
            c.update(lag_quantiles(self.lag_counts))
        c["replay_shards"] = len(self.sampler.shards)
        if digest:
            # Every rank of a group reports the same digest at the same update count.
            c["params_digest"] = f"{self.algo.updates}:{params_digest(self.algo.online)}"

    def close(self) -> None:
        self.priorities.flush()
        self.sampler.close()
        self.members.close()


def _restore_newest(
    enabled: bool,
    store: CheckpointStore,
    prefetch: Prefetcher | None,
    model: Model,
    epoch: int,
    t_lease: float,
    tel: Telemetry,
) -> tuple[dict, str]:
    """The newest checkpoint with every chunk valid on some shard (a standby's prefetched
    copy when it has one) into `model`: its counters and name ("-", {} on a fresh start)."""
    if not enabled:
        return {}, "-"
    loaded = prefetch.take() if prefetch is not None else None
    prefetched = loaded is not None
    if loaded is None:
        loaded = store.recover()
    if loaded is None:
        return {}, "-"
    counters = restore(model.algo, loaded.snapshot)
    _load_norm(model.norm, counters, tel)
    tel.event(
        "restore",
        ckpt=loaded.ckpt,
        epoch=epoch,
        seconds=round(time.monotonic() - t_lease, 3),
        prefetched=int(prefetched),
        bad_replicas=len(loaded.bad_replicas),
        skipped=len(loaded.skipped),
        detail="; ".join((loaded.skipped + loaded.bad_replicas)[:5])[:500],
    )
    return counters, loaded.ckpt


def _take(batches: Iterator[TensorBatch], n: int) -> list[TensorBatch] | None:
    """The next `n` batches (one per model of a population), or None once the sampler stops."""
    out = []
    for _ in range(n):
        batch = next(batches, None)
        if batch is None:
            return None
        out.append(batch)
    return out


def lag_quantiles(counts: np.ndarray) -> dict[str, float]:
    """policy_lag_p50/p90/p99/max (in versions) of a lag histogram; the last bin means "or more"."""
    total = int(counts.sum())
    if total == 0:
        return {}
    cum = np.cumsum(counts)
    out = {f"policy_lag_p{q}": float(np.searchsorted(cum, total * q / 100)) for q in (50, 90, 99)}
    out["policy_lag_max"] = float(np.flatnonzero(counts)[-1])
    return out


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
        table=UNROLLS if on_policy(cfg) else None,
    )
    return members, sampler


def _load_sampler(sampler: SampleClient, state: object, tel: Telemetry) -> None:
    try:
        load_sampler_state(sampler, state)
    except ProtocolError as exc:  # trains on with a fresh draw order rather than not at all
        tel.event("rejected_input", what="checkpoint sampler state", message=str(exc)[:300])


def _load_norm(norm: ObsNorm | None, counters: dict, tel: Telemetry) -> None:
    if norm is None or "obs_norm" not in counters:
        return
    try:
        norm.load(counters["obs_norm"])
    except ProtocolError as exc:  # trains on with fresh statistics rather than not at all
        tel.event("rejected_input", what="checkpoint obs_norm state", message=str(exc)[:300])


def _newest_epoch(store: CheckpointStore) -> int:
    """The newest epoch any committed checkpoint on any shard names: the next epoch's floor."""
    return max((Version.parse(ckpt).epoch for ckpt in store.committed()), default=0)


def _to_batch(batch: TensorBatch, weighted: bool, norm: ObsNorm | None = None) -> Batch | Unrolls:
    t = batch.tensors
    if "mask" in t:  # unrolls (on-policy): obs [B, T + 1, ...]
        obs = t["obs"]
        if norm is not None:
            norm.update(obs[:, :-1].reshape(-1, *obs.shape[2:]))
            obs = norm.normalize(obs.reshape(-1, *obs.shape[2:])).view(obs.shape)
        return Unrolls(**{**{k: t[k] for k in UNROLL_FIELDS}, "obs": obs})
    weight = t["weight"] if weighted else None
    obs, next_obs = t["obs"], t["next_obs"]
    if norm is not None:  # env.normalize_obs: statistics of the observations trained on
        norm.update(obs)
        obs, next_obs = norm.normalize(obs), norm.normalize(next_obs)
    return Batch(obs, t["action"], t["reward"], next_obs, t["discount"], weight)
