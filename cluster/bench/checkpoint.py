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
   Figures: mean step time per arm, stall of the training thread per capture (the capture
   call plus what the next optimizer step waits for the background copy), commit latency.
   In-run baseline of the stall: the same capture done wholly on the training thread
   (one copy of the state, what the learner paid before background captures).
3. Baselines, same state, same run: torch.save to local disk + fsync (blocking on the
   training thread), and torch.distributed.checkpoint.async_save when it is available.
4. Recovery, real processes and SIGKILL: cold (kill the learner, start a new one) and warm
   (a `--standby` learner already built and waiting on the lease), each timed from the kill
   to the first version of a newer epoch in `model:latest`. The killed learner is a real
   `canopy learner` that restored the benchmark's checkpoint and published; it is given no
   replay shard, so it idles in sampling afterwards (recovery does not depend on that).

5. With --tls, the training arms and the recovery trials again on TLS-only shards
   (cluster.tls): `tls_cost` sets commit and write latency, step overhead and recovery
   times over TLS beside the plaintext figures of the same run, with their ratio.

The shards, the learner processes and the recovery trials are checkpoint_procs.py.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import torch
from rich.progress import Progress

from canopy.cluster.bench import harness, report
from canopy.cluster.bench.checkpoint_procs import Cluster, cluster, recovery_trial
from canopy.config import Config
from canopy.keys import Keys
from canopy.redisconn import connect

GOAL_OVERHEAD_PCT = 1.0
GOAL_STALL_MS = 5.0
GOAL_COLD_S = 5.0
GOAL_WARM_S = 1.5
OBS, ACTIONS, LAYERS = 4, 2, 3  # CartPole-sized ends, so `canopy learner` processes can restore it


def hidden_for(state_mb: float) -> list[int]:
    """Hidden widths so online + target + Adam m, v (16 bytes per parameter) ~= state_mb MiB."""
    params = state_mb * 2**20 / 16
    # params ~= (LAYERS-1) h^2 + (OBS + LAYERS + ACTIONS) h: solve for h.
    a, b = LAYERS - 1, OBS + LAYERS + ACTIONS
    h = (-b + math.sqrt(b * b + 4 * a * params)) / (2 * a)
    return [max(1, round(h))] * LAYERS


# ---- training arms ---------------------------------------------------------------------
class Trainer:
    """A real DQN learner state, updated on a fixed random batch (the model is what matters here)."""

    def __init__(self, cfg: Config):
        from canopy.learner.algorithms.dqn import DQN, Batch
        from canopy.learner.network import QNetwork

        torch.manual_seed(0)
        net = QNetwork(OBS, ACTIONS, cfg.learner.hidden, layer_norm=cfg.learner.layer_norm)
        self.algo = DQN(net, cfg.learner)
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
        """One DQN update on the fixed batch."""
        self.algo.update(self.batch)


def train(
    trainer: Trainer, seconds: float, progress: Any = None, ckpt: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Train for `seconds`; with `ckpt`, capture every period and submit to its writer.

    `ckpt` holds capturer, writer, lease, config dict, period. Returns the step times
    and the training-thread stall of each capture: the capture call plus the fence wait of
    the step after it (learner/checkpoint/state.py), which is also inside that step's time.
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
                capturer = ckpt["capturer"]
                t1 = time.monotonic()
                snap = capturer.capture(
                    trainer.algo, {"epoch": ckpt["lease"].epoch}, ckpt["cfg"], background=True
                )
                stalls.append(time.monotonic() - t1)
                writer.submit(snap, f"{ckpt['lease'].epoch}.{trainer.algo.updates}", ckpt["lease"].token)
                next_ckpt += ckpt["period"]
                fences = capturer.fences
                t0 = time.monotonic()
                trainer.step()
                steps.append(time.monotonic() - t0)
                if capturer.fences > fences:
                    stalls[-1] += capturer.last_fence_wait_s
                continue
        t0 = time.monotonic()
        trainer.step()
        steps.append(time.monotonic() - t0)
        if progress is not None:
            progress()
    return {"steps": steps, "stalls": stalls, "deferred": deferred, "wall_s": time.monotonic() - t_start}


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
    return {"bytes": size, "blocking_ms": harness.ms_summary(saves), "load_ms": harness.ms_summary(loads)}


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
        return {
            "available": True,
            "blocking_ms": harness.ms_summary(blocking),
            "complete_ms": harness.ms_summary(total),
        }
    except Exception as exc:  # a baseline that cannot run is reported, not fatal
        return {"available": False, "reason": f"{type(exc).__name__}: {exc}"[:300]}


# ---- the checkpoint path ---------------------------------------------------------------
class Checkpointing:
    """The learner's checkpoint path on the bench's shards: its lease, a capturer and the
    writer thread; `events` collects what the writer reports (commits, repairs, failures)."""

    def __init__(self, cfg: Config, r: redis.Redis, keys: Keys):
        from canopy.config import to_dict
        from canopy.learner.checkpoint.state import Capturer
        from canopy.learner.checkpoint.writer import Writer
        from canopy.learner.role import make_store
        from canopy.lease import Lease

        self.r, self.keys = r, keys
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()  # the writer thread reports while the bench reads
        self.lease = Lease(r, keys, learner=0, ttl_s=cfg.checkpoint.lease_ttl_s)
        self.lease.acquire(timeout=10)
        self.lease.start_renewing(on_lost=lambda: None)
        self.writer = Writer(make_store(cfg, 0), 0, self.event, guard=self.lease.check)
        self.capturer = Capturer()
        self.cfg_dict = to_dict(cfg)

    def event(self, kind: str, **fields: Any) -> None:
        """The writer's report callback: keep one event (called from the writer thread)."""
        with self._lock:
            self.events.append({"kind": kind, **fields})

    def first_captures(self, trainer: Trainer) -> tuple[float, float]:
        """Allocate both capture buffers (and fault their pages in) before the timed arms: a
        one-time cost per learner start, reported on its own. Returns the first capture's
        seconds and then a capture into warm buffers wholly on the training thread (the
        stall's baseline: one copy of the state)."""
        t0 = time.monotonic()
        self.capturer.capture(trainer.algo, {}, self.cfg_dict)
        first_capture_s = time.monotonic() - t0
        self.capturer.capture(trainer.algo, {}, self.cfg_dict)
        t0 = time.monotonic()
        self.capturer.capture(trainer.algo, {}, self.cfg_dict)
        return first_capture_s, time.monotonic() - t0

    def arm(self, period: float) -> dict[str, Any]:
        """What `train` needs to checkpoint every `period` s."""
        return {
            "capturer": self.capturer,
            "writer": self.writer,
            "lease": self.lease,
            "cfg": self.cfg_dict,
            "period": period,
        }

    def last(self, trainer: Trainer) -> None:
        """One more committed checkpoint of the final state, for the recovery trials; then
        the lease is handed over at once: the benchmark's trainer is done."""
        self.writer.submit(
            self.capturer.capture(trainer.algo, {}, self.cfg_dict),
            f"{self.lease.epoch}.{trainer.algo.updates}",
            self.lease.token,
        )
        self.writer.wait_idle(120)
        self.writer.close()
        self.lease.stop()
        self.r.delete(self.keys.lease)


@dataclass
class Measured:
    """What the bench measured while its cluster was up."""

    state_bytes: int
    first_capture_s: float
    sync_capture_s: float  # the whole copy on the training thread: the stall's baseline
    arms: dict[str, list[dict[str, Any]]]  # "off" / "on": what `train` returned, per run of each
    commits: list[dict[str, Any]]  # commit events of the timed arm
    failed: list[dict[str, Any]]  # writer events that were neither a commit nor a repair
    save: dict[str, Any]  # torch.save + fsync baseline
    dcp: dict[str, Any]  # torch.distributed.checkpoint.async_save baseline
    recovery: dict[str, list[dict[str, Any]]]  # "cold" / "warm": one entry per trial

    @property
    def overhead_pct(self) -> float:
        """How much longer a training step takes with checkpoints than without (mean step times), in %."""
        off = [s for a in self.arms["off"] for s in a["steps"]]
        on = [s for a in self.arms["on"] for s in a["steps"]]
        return 100 * (statistics.fmean(on) / statistics.fmean(off) - 1)

    @property
    def stalls(self) -> list[float]:
        """The training thread's stall of every capture in the "on" arm, in seconds."""
        return [s for a in self.arms["on"] for s in a["stalls"]]

    def save_overhead_pct(self, period: float) -> float | None:
        """What torch.save + fsync at the same period would take from training: its blocking
        time per period."""
        save_ms = self.save["blocking_ms"]["p50"]
        return 100 * (save_ms / 1000) / period if save_ms is not None else None

    @property
    def load_s(self) -> float | None:
        """Median torch.load time of the torch.save baseline's file, in seconds (None without one)."""
        return self.save["load_ms"]["p50"] / 1000 if self.save["load_ms"]["p50"] is not None else None

    def recovery_s(self, kind: str) -> float | None:
        """Median seconds of the `kind` recovery trials."""
        seconds = [t["seconds"] for t in self.recovery[kind]]
        return harness.round_or_none(statistics.median(seconds)) if seconds else None


def measure(
    args: argparse.Namespace, c: Cluster, workdir: Path, bar: Progress, baselines: bool = True
) -> Measured:
    """Train with and without checkpoints, the baselines (if `baselines`), then the recovery trials."""
    cfg, keys = c.cfg, Keys(c.cfg.run.name)
    r = connect(cfg.cluster, "bench", 0)
    task = bar.add_task("building the model", total=None)
    trainer = Trainer(cfg)
    state_bytes = sum(t.numel() * t.element_size() for t in _flat(trainer))
    ck = Checkpointing(cfg, r, keys)
    first_capture_s, sync_capture_s = ck.first_captures(trainer)
    arms = train_arms(args, trainer, ck, bar, task)
    bar.update(task, description="baseline: torch.save + fsync", total=None)
    arm_events = len(ck.events)  # commit figures cover the timed arm only
    ck.last(trainer)
    save = torch_save_baseline(trainer, workdir, args.baseline_trials) if baselines else {}
    bar.update(task, description="baseline: torch.distributed.checkpoint.async_save")
    dcp = (
        dcp_async_baseline(trainer, workdir, args.baseline_trials)
        if baselines and not args.no_dcp
        else {"available": False, "reason": "--no-dcp" if baselines else "the TLS pass"}
    )
    del trainer  # the learner processes below need the memory more
    recovery: dict[str, list[dict[str, Any]]] = {"cold": [], "warm": []}
    if not args.no_recovery:
        for i in range(args.recovery_trials):
            for kind in ("cold", "warm"):
                bar.update(task, description=f"recovery, {kind}, trial {i + 1}/{args.recovery_trials}")
                recovery[kind].append(recovery_trial(c, r, keys, warm=kind == "warm"))
    bar.update(task, description="done", total=1, completed=1)
    r.close()
    return Measured(
        state_bytes=state_bytes,
        first_capture_s=first_capture_s,
        sync_capture_s=sync_capture_s,
        arms=arms,
        commits=[e for e in ck.events[:arm_events] if e["kind"] == "checkpoint_commit"],
        failed=[e for e in ck.events if e["kind"] not in ("checkpoint_commit", "checkpoint_repair")],
        save=save,
        dcp=dcp,
        recovery=recovery,
    )


def train_arms(
    args: argparse.Namespace, trainer: Trainer, ck: Checkpointing, bar: Progress, task: Any
) -> dict[str, list[dict[str, Any]]]:
    """The arms in the order off / on / off (see the module docstring)."""
    d = args.duration
    bar.update(task, description="training, no checkpoints (1/2)", total=2 * d, completed=0)
    arms: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}

    def ticker(offset: float) -> Callable[[], None]:
        t = time.monotonic()
        return lambda: bar.update(task, completed=offset + time.monotonic() - t)

    arms["off"].append(train(trainer, d / 2, ticker(0)))
    bar.update(task, description=f"training, checkpoint every {args.period:g}s")
    arms["on"].append(train(trainer, d, ticker(d / 2), ck.arm(args.period)))
    ck.writer.wait_idle(120)  # outside the timed arm: the last write finishes before "off" resumes
    bar.update(task, description="training, no checkpoints (2/2)")
    arms["off"].append(train(trainer, d / 2, ticker(1.5 * d)))
    bar.update(task, completed=2 * d)
    return arms


# ---- main --------------------------------------------------------------------------------
def main(args: argparse.Namespace) -> int:
    """Measure on fresh shards (one torch thread); the report goes to `--json`."""
    torch.set_num_threads(1)
    runs: dict[bool, Measured] = {}
    for tls in (False, True) if args.tls else (False,):  # the TLS pass on shards of its own
        with (
            harness.scratch_dir("canopy-bench-ckpt-", args.workdir or None) as workdir,
            cluster(args, workdir, hidden_for(args.state_mb), tls) as c,
            harness.progress(transient=False) as bar,
        ):
            runs[tls] = measure(args, c, workdir, bar, baselines=not tls)
            cfg = c.cfg
    figures = figures_of(args, cfg, runs[False])
    if args.tls:
        figures["tls_cost"] = harness.tls_cost(tls_figures(runs[False]), tls_figures(runs[True]))
        print(json.dumps({"tls_cost": figures["tls_cost"]}, indent=1))
    report.write(args.json, "checkpoint", figures, checks_of(args, runs[False]))
    return 0


def tls_figures(m: Measured) -> dict[str, float | None]:
    """The figures of a pass that TLS may change (tls_cost)."""
    return {
        "commit_ms_p50": harness.ms_summary([float(e["commit_s"]) for e in m.commits])["p50"],
        "write_ms_p50": harness.ms_summary([float(e["write_s"]) for e in m.commits])["p50"],
        "step_overhead_pct": round(m.overhead_pct, 2),
        "stall_ms_p50": harness.ms_summary(m.stalls)["p50"],
        "recovery_cold_s": m.recovery_s("cold"),
        "recovery_warm_s": m.recovery_s("warm"),
    }


def figures_of(args: argparse.Namespace, cfg: Config, m: Measured) -> dict[str, Any]:
    """The report's figures: the configuration, step and stall times, commits, recovery, baselines."""
    return {
        "config": {
            "state_mb": args.state_mb,
            "state_bytes": m.state_bytes,
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
        "step_ms_off": harness.ms_summary([s for a in m.arms["off"] for s in a["steps"]]),
        "step_ms_on": harness.ms_summary([s for a in m.arms["on"] for s in a["steps"]]),
        "step_overhead_pct": round(m.overhead_pct, 2),
        "stall_ms": harness.ms_summary(m.stalls),
        "first_capture_ms": round(1000 * m.first_capture_s, 2),
        "baseline_sync_capture_ms": round(1000 * m.sync_capture_s, 2),
        "checkpoints": len(m.stalls),
        "deferred": sum(a["deferred"] for a in m.arms["on"]),
        "commit_ms": harness.ms_summary([float(e["commit_s"]) for e in m.commits]),
        "write_ms": harness.ms_summary([float(e["write_s"]) for e in m.commits]),
        "commit_failures": m.failed,
        "recovery_cold": m.recovery["cold"],
        "recovery_warm": m.recovery["warm"],
        "baseline_torch_save_fsync": {
            **m.save,
            "overhead_pct_at_period": harness.round_or_none(m.save_overhead_pct(args.period)),
        },
        "baseline_dcp_async_save": m.dcp,
    }


def checks_of(args: argparse.Namespace, m: Measured) -> list[dict[str, Any]]:
    """The report's checks against the goals: step overhead, stall, cold and warm recovery."""
    overhead_pct, stall_ms = m.overhead_pct, harness.ms_summary(m.stalls)
    cold_s, warm_s = m.recovery_s("cold"), m.recovery_s("warm")
    load_s = harness.round_or_none(m.load_s)
    return [
        report.check(
            "step_time_overhead",
            round(overhead_pct, 2),
            "%",
            f"<= {GOAL_OVERHEAD_PCT:g}",
            harness.round_or_none(m.save_overhead_pct(args.period)),
            overhead_pct <= GOAL_OVERHEAD_PCT,
        ),
        report.check(
            "training_thread_stall_per_checkpoint",
            stall_ms["max"],
            "ms",
            f"<= {GOAL_STALL_MS:g}; baseline: the same capture on the training thread",
            round(1000 * m.sync_capture_s, 2),
            stall_ms["max"] is not None and stall_ms["max"] <= GOAL_STALL_MS,
        ),
        report.check(
            "recovery_cold",
            cold_s,
            "s",
            f"<= {GOAL_COLD_S:g}",
            load_s,
            cold_s is not None and cold_s <= GOAL_COLD_S,
        ),
        report.check(
            "recovery_warm_standby",
            warm_s,
            "s",
            f"<= {GOAL_WARM_S:g}",
            load_s,
            warm_s is not None and warm_s <= GOAL_WARM_S,
        ),
    ]


def _flat(trainer: Trainer) -> list[torch.Tensor]:
    from canopy.learner.checkpoint.state import named_tensors

    return [t for _, t in named_tensors(trainer.algo)]


def trainer_params(cfg: Config) -> int:
    """Parameters of one of the Trainer's networks under `cfg` (a plain MLP: weights and biases)."""
    sizes = [OBS, *cfg.learner.hidden, ACTIONS]
    return sum(a * b + b for a, b in itertools.pairwise(sizes))
