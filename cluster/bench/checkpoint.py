"""`canopy bench checkpoint`: what checkpointing the learner's state into Redis costs, and recovery.

Where it sits: it drives the real checkpoint path (learner/checkpoint: Capturer -> Writer
thread -> CheckpointStore over real `redis-server` shards, placement plan over pretend
hosts) beside a training loop, then real `canopy learner` processes for recovery.

1. Shards: `--shards` redis-server processes (started like `canopy up` does, through
   `canopy redis`, so persisted the same way: append-only file, fsync every second; the
   "on" arm pays for that too), grouped round-robin into `--hosts` pretend hosts;
   R = `--replicas`.
2. Training: a DQN (the learner's algorithm) whose online + target networks and Adam's two
   moments add up to `--state-mb`; real updates on CPU with torch.set_num_threads(1) on a
   fixed random batch. Arms, in the order off / on / off (the two halves of the "off" arm
   bracket the "on" arm, so a load drift on this shared machine hits both alike):
   "off" trains only; "on" also captures the state every `--period` s (first one at half
   a period, so the arm holds duration/period checkpoints) and hands it to the writer.
   Figures: mean step time per arm, stall of the training thread per capture, commit latency.
3. Baselines, same state, same run: torch.save to local disk + fsync (blocking on the
   training thread), and torch.distributed.checkpoint.async_save when it is available.
4. Recovery, real processes and SIGKILL: cold (kill the learner, start a new one) and warm
   (a `--standby` learner already built and waiting on the lease), each timed from the kill
   to the first version of a newer epoch in `model:latest`. The killed learner is a real
   `canopy learner` that restored the benchmark's checkpoint and published; it is given no
   replay shard, so it idles in sampling afterwards (recovery does not depend on that).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import torch
from rich.progress import Progress

from cluster import config as config_mod
from cluster.bench import report
from cluster.config import Config
from cluster.keys import Keys
from cluster.lifecycle import wait_until
from cluster.ports import free_ports
from cluster.redisconn import connect
from cluster.version import Version

GOAL_OVERHEAD_PCT = 3.0
GOAL_STALL_MS = 20.0
GOAL_COLD_S = 5.0
GOAL_WARM_S = 1.5
OBS, ACTIONS, LAYERS = 4, 2, 3  # CartPole-sized ends, so `canopy learner` processes can restore it
START_TIMEOUT_S = 120.0
RECOVERY_TIMEOUT_S = 60.0


def hidden_for(state_mb: float) -> list[int]:
    """Hidden widths so online + target + Adam m, v (16 bytes per parameter) ~= state_mb MiB."""
    params = state_mb * 2**20 / 16
    # params ~= (LAYERS-1) h^2 + (OBS + LAYERS + ACTIONS) h: solve for h.
    a, b = LAYERS - 1, OBS + LAYERS + ACTIONS
    h = (-b + math.sqrt(b * b + 4 * a * params)) / (2 * a)
    return [max(1, round(h))] * LAYERS


@dataclass
class Cluster:
    """The benchmark's Redis shards and learner processes; `close` ends every one of them."""

    cfg: Config
    config_path: Path
    procs: list[subprocess.Popen] = field(default_factory=list)

    def spawn(self, role: str, ident: int, *args: str) -> subprocess.Popen:
        log = open(Path(self.cfg.run.dir) / f"{role}-{ident}.log", "ab")  # noqa: SIM115 (child owns it)
        env = {**os.environ, "CANOPY_PARENT_PID": str(os.getpid()), "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-m", "cluster.cli", role, "--config", str(self.config_path)]
        proc = subprocess.Popen(
            [*cmd, "--id", str(ident), *args], stdout=log, stderr=subprocess.STDOUT, env=env
        )
        log.close()
        self.procs.append(proc)
        return proc

    def clients(self) -> list[redis.Redis]:
        return [connect(self.cfg.cluster, "bench", 0, shard=i) for i in range(len(self.cfg.cluster.redis))]

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)


@contextlib.contextmanager
def cluster(args: argparse.Namespace, workdir: Path) -> Iterator[Cluster]:
    cfg = Config()
    cfg.run.name = "bench-ckpt-" + os.urandom(3).hex()
    cfg.run.dir = str(workdir)
    cfg.env.id = "CartPole-v1"
    cfg.redis.shards = args.shards
    # Every shard may hold R/shards of keep+1 states plus a pending one: leave room.
    cfg.redis.maxmemory_mb = max(256, int(args.state_mb * 4 * args.replicas))
    cfg.learner.hidden = hidden_for(args.state_mb)
    cfg.learner.device = "cpu"
    cfg.learner.threads = 1
    cfg.learner.batch_size = args.batch
    ck = cfg.checkpoint
    ck.replicas, ck.every_s, ck.keep = args.replicas, args.period, 2
    ck.shard_hosts = [f"host{i % args.hosts}" for i in range(args.shards)]
    ports = free_ports(args.shards + 1)
    cfg.cluster.redis = [f"127.0.0.1:{p}" for p in ports[:-1]]
    # No replay shard listens here: a recovered learner publishes, then waits in sampling.
    cfg.cluster.replay = [f"tcp://127.0.0.1:{ports[-1]}"]
    pw = workdir / "redis.password"
    fd = os.open(pw, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(os.urandom(18).hex())
    cfg.cluster.password_file = str(pw)
    config_path = workdir / "config.toml"
    config_mod.save(cfg, config_path)
    c = Cluster(cfg, config_path)
    try:
        for i in range(args.shards):
            c.spawn("redis", i)
        for r in c.clients():
            wait_until(lambda r=r: _pings(r), 15, "a redis shard to answer")
            r.close()
        yield c
    finally:
        c.close()


def _pings(r: redis.Redis) -> bool:
    try:
        return bool(r.ping())
    except redis.ConnectionError:
        return False


# ---- training arms ---------------------------------------------------------------------
class Trainer:
    """A real DQN learner state, updated on a fixed random batch (the model is what matters here)."""

    def __init__(self, cfg: Config):
        from learner.algorithms.dqn import DQN, Batch
        from learner.network import QNetwork

        torch.manual_seed(0)
        self.algo = DQN(QNetwork(OBS, ACTIONS, cfg.learner.hidden), cfg.learner)
        n = cfg.learner.batch_size
        self.batch = Batch(
            torch.randn(n, OBS),
            torch.randint(0, ACTIONS, (n,)),
            torch.randn(n),
            torch.randn(n, OBS),
            torch.full((n,), 0.97),
        )
        self.step()  # Adam's moments exist only after the first step
        self.params = sum(p.numel() for p in self.algo.online.parameters())

    def step(self) -> None:
        self.algo.update(self.batch)


def train(
    trainer: Trainer, seconds: float, progress: Any = None, ckpt: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Train for `seconds`; with `ckpt`, capture every period and submit to its writer.

    `ckpt` holds capturer, writer, lease, config dict, period. Returns the step times
    and the training-thread stall of each capture.
    """
    steps: list[float] = []
    stalls: list[float] = []
    deferred = 0
    t_start = time.monotonic()
    next_ckpt = t_start + (ckpt["period"] / 2 if ckpt else math.inf)
    while (now := time.monotonic()) - t_start < seconds:
        if now >= next_ckpt:
            writer = ckpt["writer"]
            if writer.busy():
                deferred += 1  # as the learner does: keep it due, never queue behind a write
            else:
                t1 = time.monotonic()
                snap = ckpt["capturer"].capture(trainer.algo, {"epoch": ckpt["lease"].epoch}, ckpt["cfg"])
                stalls.append(time.monotonic() - t1)
                writer.submit(snap, f"{ckpt['lease'].epoch}.{trainer.algo.updates}", ckpt["lease"].token)
                next_ckpt += ckpt["period"]
        t0 = time.monotonic()
        trainer.step()
        steps.append(time.monotonic() - t0)
        if progress is not None:
            progress()
    return {"steps": steps, "stalls": stalls, "deferred": deferred, "wall_s": time.monotonic() - t_start}


def _ms(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"n": 0, "mean": None, "p50": None, "p99": None, "max": None}
    s = sorted(values)
    return {
        "n": len(s),
        "mean": round(1000 * statistics.fmean(s), 3),
        "p50": round(1000 * s[len(s) // 2], 3),
        "p99": round(1000 * s[min(len(s) - 1, int(0.99 * len(s)))], 3),
        "max": round(1000 * s[-1], 3),
    }


# ---- baselines -------------------------------------------------------------------------
def _state_dict(trainer: Trainer) -> dict[str, Any]:
    a = trainer.algo
    return {
        "online": a.online.state_dict(),
        "target": a.target.state_dict(),
        "optim": a.optimizer.state_dict(),
    }


def torch_save_baseline(trainer: Trainer, workdir: Path, trials: int) -> dict[str, Any]:
    """torch.save + fsync of the same state to local disk: the training thread waits for all of it."""
    path = workdir / "baseline.pt"
    saves, loads = [], []
    for _ in range(trials):
        t0 = time.monotonic()
        with open(path, "wb") as f:
            torch.save(_state_dict(trainer), f)
            f.flush()
            os.fsync(f.fileno())
        saves.append(time.monotonic() - t0)
        t0 = time.monotonic()
        torch.load(path, weights_only=True)
        loads.append(time.monotonic() - t0)
    size = path.stat().st_size
    path.unlink()
    return {"bytes": size, "blocking_ms": _ms(saves), "load_ms": _ms(loads)}


def dcp_async_baseline(trainer: Trainer, workdir: Path, trials: int) -> dict[str, Any]:
    """torch.distributed.checkpoint.async_save (gloo, world size 1): blocking part and completion."""
    try:
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        if not hasattr(dcp, "async_save"):
            return {"available": False, "reason": "torch.distributed.checkpoint has no async_save"}
        own_group = not dist.is_initialized()
        if own_group:
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        blocking, total = [], []
        try:
            for i in range(trials):
                t0 = time.monotonic()
                fut = dcp.async_save(_state_dict(trainer), checkpoint_id=str(workdir / f"dcp-{i}"))
                blocking.append(time.monotonic() - t0)
                fut.result(timeout=300)
                total.append(time.monotonic() - t0)
        finally:
            if own_group:
                dist.destroy_process_group()
        return {"available": True, "blocking_ms": _ms(blocking), "complete_ms": _ms(total)}
    except Exception as exc:  # a baseline that cannot run is reported, not fatal
        return {"available": False, "reason": f"{type(exc).__name__}: {exc}"[:300]}


# ---- recovery --------------------------------------------------------------------------
def _latest(r: redis.Redis, keys: Keys) -> Version | None:
    try:
        raw = r.get(keys.model_latest)
    except redis.RedisError:
        return None
    return Version.parse(raw) if raw else None


def _newer(r: redis.Redis, keys: Keys, epoch: int) -> Version | None:
    v = _latest(r, keys)
    return v if v is not None and v.epoch > epoch else None


def _events(r: redis.Redis, keys: Keys, kind: str) -> list[dict[str, str]]:
    out = []
    for _, fields in r.xrange(keys.events, count=100_000):
        e = {k.decode(): v.decode() for k, v in fields.items()}
        if e.get("kind") == kind:
            out.append(e)
    return out


def recovery_trial(c: Cluster, r: redis.Redis, keys: Keys, warm: bool) -> dict[str, Any]:
    """Start a primary (and a standby when warm), SIGKILL the primary, time the takeover."""
    before = _latest(r, keys)
    primary = c.spawn("learner", 0)
    standby = None
    try:
        first = wait_until(
            lambda: _newer(r, keys, before.epoch if before else 0),
            START_TIMEOUT_S,
            "the learner's first version",
        )
        if warm:
            # Started once the primary holds the lease, so the primary is the one killed.
            standby = c.spawn("learner", 1, "--standby")
            wait_until(
                lambda: r.hget(keys.proc("learner", 1), "state") == b"standby",
                START_TIMEOUT_S,
                "the standby to be built",
            )
        time.sleep(0.5)  # a few lease renewals, as in a running learner
        n_restores = len(_events(r, keys, "restore"))
        primary.send_signal(signal.SIGKILL)
        t_kill = time.monotonic()
        primary.wait(timeout=10)
        successor = standby if standby is not None else c.spawn("learner", 0)
        after = wait_until(
            lambda: _newer(r, keys, first.epoch), RECOVERY_TIMEOUT_S, "a version of a newer epoch", 0.002
        )
        seconds = time.monotonic() - t_kill
        restores = _events(r, keys, "restore")[n_restores:]
        return {
            "seconds": round(seconds, 3),
            "killed_version": str(first),
            "new_version": str(after),
            "restored": restores[0]["ckpt"] if restores else None,
            "restore_s": float(restores[0]["seconds"]) if restores else None,
            "prefetched": restores[0].get("prefetched") == "1" if restores else False,
            "successor_pid": successor.pid,
        }
    finally:
        for p in (primary, standby):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(timeout=10)
        # Whoever took over dies too: the next trial starts from a free lease.
        for p in c.procs:
            if p.args[3] == "learner" and p.poll() is None:
                p.kill()
                p.wait(timeout=10)
        wait_until(lambda: not r.exists(keys.lease), 10, "the lease to expire")


# ---- main --------------------------------------------------------------------------------
def main(args: argparse.Namespace) -> int:
    from cluster.config import to_dict
    from learner.checkpoint.lease import Lease
    from learner.checkpoint.state import Capturer
    from learner.checkpoint.writer import Writer
    from learner.role import make_store

    torch.set_num_threads(1)
    tmp_parent = args.workdir or None
    with tempfile.TemporaryDirectory(prefix="canopy-bench-ckpt-", dir=tmp_parent) as tmp:
        workdir = Path(tmp)
        with cluster(args, workdir) as c, Progress() as bar:
            cfg, keys = c.cfg, Keys(c.cfg.run.name)
            r = connect(cfg.cluster, "bench", 0)
            task = bar.add_task("building the model", total=None)
            trainer = Trainer(cfg)
            state_bytes = sum(t.numel() * t.element_size() for t in _flat(trainer))
            events: list[dict[str, Any]] = []
            lock = threading.Lock()

            def event(kind: str, **fields: Any) -> None:
                with lock:
                    events.append({"kind": kind, **fields})

            lease = Lease(r, keys, learner=0, ttl_s=cfg.checkpoint.lease_ttl_s)
            lease.acquire(timeout=10)
            lease.start_renewing(on_lost=lambda: None)
            store = make_store(cfg, 0)
            writer = Writer(store, 0, event, guard=lease.check)
            capturer = Capturer()
            cfg_dict = to_dict(cfg)
            # Both capture buffers are allocated (and their pages faulted in) before the timed
            # arms: a one-time cost per learner start, reported on its own.
            t0 = time.monotonic()
            capturer.capture(trainer.algo, {}, cfg_dict)
            first_capture_s = time.monotonic() - t0
            capturer.capture(trainer.algo, {}, cfg_dict)

            d = args.duration
            bar.update(task, description="training, no checkpoints (1/2)", total=2 * d, completed=0)
            arms: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}

            def ticker(offset: float) -> Any:
                t = time.monotonic()
                return lambda: bar.update(task, completed=offset + time.monotonic() - t)

            arms["off"].append(train(trainer, d / 2, ticker(0)))
            bar.update(task, description=f"training, checkpoint every {args.period:g}s")
            on = {
                "capturer": capturer,
                "writer": writer,
                "lease": lease,
                "cfg": cfg_dict,
                "period": args.period,
            }
            arms["on"].append(train(trainer, d, ticker(d / 2), on))
            writer.wait_idle(120)  # outside the timed arm: the last write finishes before "off" resumes
            bar.update(task, description="training, no checkpoints (2/2)")
            arms["off"].append(train(trainer, d / 2, ticker(1.5 * d)))
            bar.update(task, completed=2 * d)

            bar.update(task, description="baseline: torch.save + fsync", total=None)
            arm_events = len(events)  # commit figures cover the timed arm only
            # One more committed checkpoint of the final state for the recovery trials.
            writer.submit(
                capturer.capture(trainer.algo, {}, cfg_dict),
                f"{lease.epoch}.{trainer.algo.updates}",
                lease.token,
            )
            writer.wait_idle(120)
            writer.close()
            lease.stop()
            r.delete(keys.lease)  # hand over at once: the benchmark's trainer is done
            save = torch_save_baseline(trainer, workdir, args.baseline_trials)
            bar.update(task, description="baseline: torch.distributed.checkpoint.async_save")
            dcp = (
                dcp_async_baseline(trainer, workdir, args.baseline_trials)
                if not args.no_dcp
                else {
                    "available": False,
                    "reason": "--no-dcp",
                }
            )
            del trainer  # the learner processes below need the memory more

            recovery: dict[str, list[dict[str, Any]]] = {"cold": [], "warm": []}
            if not args.no_recovery:
                for i in range(args.recovery_trials):
                    for kind in ("cold", "warm"):
                        bar.update(
                            task, description=f"recovery, {kind}, trial {i + 1}/{args.recovery_trials}"
                        )
                        recovery[kind].append(recovery_trial(c, r, keys, warm=kind == "warm"))
            bar.update(task, description="done", total=1, completed=1)
            r.close()

    off = [s for a in arms["off"] for s in a["steps"]]
    on_steps = [s for a in arms["on"] for s in a["steps"]]
    stalls = [s for a in arms["on"] for s in a["stalls"]]
    commits = [e for e in events[:arm_events] if e["kind"] == "checkpoint_commit"]
    failed = [e for e in events if e["kind"] not in ("checkpoint_commit", "checkpoint_repair")]
    mean_off, mean_on = statistics.fmean(off), statistics.fmean(on_steps)
    overhead_pct = 100 * (mean_on / mean_off - 1)
    stall_ms = _ms(stalls)
    save_ms = save["blocking_ms"]["p50"]
    # What torch.save + fsync at the same period would take from training: its blocking time per period.
    save_overhead_pct = 100 * (save_ms / 1000) / args.period if save_ms is not None else None
    cold = [t["seconds"] for t in recovery["cold"]]
    warm = [t["seconds"] for t in recovery["warm"]]
    load_s = save["load_ms"]["p50"] / 1000 if save["load_ms"]["p50"] is not None else None
    figures: dict[str, Any] = {
        "config": {
            "state_mb": args.state_mb,
            "state_bytes": state_bytes,
            "params": trainer_params(cfg),
            "hidden": cfg.learner.hidden,
            "batch": args.batch,
            "duration_s": args.duration,
            "period_s": args.period,
            "shards": args.shards,
            "hosts": args.hosts,
            "replicas": args.replicas,
            "chunk_mb": cfg.checkpoint.chunk_mb,
            "rate_mb_s": cfg.checkpoint.rate_mb_s,
            "lease_ttl_s": cfg.checkpoint.lease_ttl_s,
            "redis_persist": cfg.redis.persist,
            "torch_threads": 1,
            "load_average_at_end": list(os.getloadavg()),
        },
        "step_ms_off": _ms(off),
        "step_ms_on": _ms(on_steps),
        "step_overhead_pct": round(overhead_pct, 2),
        "stall_ms": stall_ms,
        "first_capture_ms": round(1000 * first_capture_s, 2),
        "checkpoints": len(stalls),
        "deferred": sum(a["deferred"] for a in arms["on"]),
        "commit_ms": _ms([float(e["commit_s"]) for e in commits]),
        "write_ms": _ms([float(e["write_s"]) for e in commits]),
        "commit_failures": failed,
        "recovery_cold": recovery["cold"],
        "recovery_warm": recovery["warm"],
        "baseline_torch_save_fsync": {**save, "overhead_pct_at_period": _r(save_overhead_pct)},
        "baseline_dcp_async_save": dcp,
    }
    cold_s = _r(statistics.median(cold)) if cold else None
    warm_s = _r(statistics.median(warm)) if warm else None
    checks = [
        report.check(
            "step_time_overhead",
            round(overhead_pct, 2),
            "%",
            f"<= {GOAL_OVERHEAD_PCT:g}",
            _r(save_overhead_pct),
            overhead_pct <= GOAL_OVERHEAD_PCT,
        ),
        report.check(
            "training_thread_stall_per_checkpoint",
            stall_ms["max"],
            "ms",
            f"<= {GOAL_STALL_MS:g}",
            save_ms,
            stall_ms["max"] is not None and stall_ms["max"] <= GOAL_STALL_MS,
        ),
        report.check(
            "recovery_cold",
            cold_s,
            "s",
            f"<= {GOAL_COLD_S:g}",
            _r(load_s),
            cold_s is not None and cold_s <= GOAL_COLD_S,
        ),
        report.check(
            "recovery_warm_standby",
            warm_s,
            "s",
            f"<= {GOAL_WARM_S:g}",
            _r(load_s),
            warm_s is not None and warm_s <= GOAL_WARM_S,
        ),
    ]
    report.write(args.json, "checkpoint", figures, checks)
    return 0


def _flat(trainer: Trainer) -> list[torch.Tensor]:
    from learner.checkpoint.state import named_tensors

    return [t for _, t in named_tensors(trainer.algo)]


def trainer_params(cfg: Config) -> int:
    sizes = [OBS, *cfg.learner.hidden, ACTIONS]
    return sum(a * b + b for a, b in itertools.pairwise(sizes))


def _r(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(x, nd)
