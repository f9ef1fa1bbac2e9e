"""`canopy bench learner`: DQN updates/s on this machine, MLP on CartPole batches and the
Nature CNN on Atari batches, on CPU and on CUDA when present; and the gain of overlapping
a learner group's gradient all-reduces across several models (learner/overlap.py).

Place in the data flow: the learner's update step alone (learner/algorithms/dqn.py), fed
ready batches, so the figure is the ceiling the replay service has to keep up with. The
in-run baseline is a bare double-DQN step in plain PyTorch on the same network and batch
(no IS weights, no gradient clipping, no TD-error bookkeeping): the ratio is canopy's
overhead per update.

Multi-model overlap: `--ranks` gloo processes on this machine (torch.multiprocessing,
one torch thread each) train `--models` MLPs together, each rank on its own batches; the
baseline is the sequential schedule (backward, blocking all-reduce, step, model after
model), the figure the overlapped one (model k's all-reduce in flight while model k+1's
gradients are computed). Both run the same number of steps, alternating, in one run.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from canopy.cluster.bench import harness, report
from canopy.config import LearnerConfig
from canopy.learner.algorithms.dqn import DQN, Batch
from canopy.learner.network import NatureCNN, QNetwork
from canopy.learner.overlap import Member, OverlapTrainer
from canopy.ports import free_ports

WORKLOADS = {
    # name: (network factory, observation shape, dtype, batch, actions)
    "cartpole_mlp": (lambda: QNetwork(4, 2, [128, 128]), (4,), torch.float32, 256, 2),
    "atari_nature_cnn": (lambda: NatureCNN(4, 6), (4, 84, 84), torch.uint8, 32, 6),
}


def make_batch(shape: tuple[int, ...], dtype: torch.dtype, batch: int, actions: int, device: str) -> Batch:
    """A fixed random batch (seed 0) of one workload's shapes, on `device`."""
    g = torch.Generator().manual_seed(0)
    if dtype == torch.uint8:
        obs = torch.randint(0, 256, (batch, *shape), generator=g, dtype=torch.uint8)
        nxt = torch.randint(0, 256, (batch, *shape), generator=g, dtype=torch.uint8)
    else:
        obs, nxt = torch.randn((batch, *shape), generator=g), torch.randn((batch, *shape), generator=g)
    return Batch(
        obs=obs.to(device),
        action=torch.randint(0, actions, (batch,), generator=g).to(device),
        reward=torch.randn(batch, generator=g).to(device),
        next_obs=nxt.to(device),
        discount=torch.full((batch,), 0.97).to(device),
        weight=torch.rand(batch, generator=g).to(device),
    )


def bare_step(online: nn.Module, target: nn.Module, opt: torch.optim.Optimizer, b: Batch) -> None:
    """The baseline: one double-DQN update in plain PyTorch (no IS weights, clipping or TD-error output)."""
    q = online(b.obs).gather(1, b.action.unsqueeze(1)).squeeze(1)
    with torch.no_grad():
        nxt = target(b.next_obs).gather(1, online(b.next_obs).argmax(1, keepdim=True)).squeeze(1)
        y = b.reward + b.discount * nxt
    loss = nn.functional.smooth_l1_loss(q, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def rate(step: Callable[[], Any], seconds: float, device: str) -> float:
    """Steps per second over about `seconds`, after a warm-up."""
    for _ in range(3):
        step()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        n += 1
    sync()
    return n / (time.perf_counter() - start)


def measure(name: str, device: str, seconds: float) -> dict:
    """Updates/s of canopy's DQN and of `bare_step` on one workload and device, and their ratio."""
    factory, shape, dtype, batch, actions = WORKLOADS[name]
    torch.manual_seed(0)
    b = make_batch(shape, dtype, batch, actions, device)
    algo = DQN(factory().to(device), LearnerConfig(batch_size=batch))
    canopy = rate(lambda: algo.update(b), seconds, device)
    online = factory().to(device)
    target = copy.deepcopy(online).requires_grad_(False)
    opt = torch.optim.Adam(online.parameters(), lr=1e-3)
    bare = rate(lambda: bare_step(online, target, opt, b), seconds, device)
    return {
        "device": device,
        "batch": batch,
        "updates_per_s": round(canopy, 1),
        "samples_per_s": round(canopy * batch, 1),
        "baseline_bare_pytorch_updates_per_s": round(bare, 1),
        "ratio_to_baseline": round(canopy / bare, 3),
    }


def main(args: argparse.Namespace) -> int:
    """Every workload on CPU (and CUDA when present), then the overlap gain; the report goes to `--json`."""
    torch.set_num_threads(args.threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    figures: dict[str, dict] = {}
    with harness.progress() as progress:
        task = progress.add_task("learner bench", total=len(WORKLOADS) * len(devices))
        for device in devices:
            for name in WORKLOADS:
                figures[f"{name}_{device}"] = measure(name, device, args.seconds)
                progress.advance(task)
    checks = [
        report.check(
            f"{key}: updates/s",
            f["updates_per_s"],
            "updates/s",
            "report (issue 6 sets no goal); within 10% of bare PyTorch",
            f["baseline_bare_pytorch_updates_per_s"],
            f["ratio_to_baseline"] >= 0.9,
        )
        for key, f in figures.items()
    ]
    models, ranks = getattr(args, "models", 4), getattr(args, "ranks", 2)
    overlap = overlap_gain(models, ranks, getattr(args, "overlap_seconds", args.seconds))
    checks.append(
        report.check(
            "multi-model overlap gain",
            overlap["gain"],
            "x",
            f"{models} models on {ranks} gloo ranks: overlapped all-reduce faster than sequential (> 1)",
            overlap["sequential_updates_per_s"],
            overlap["gain"] > 1.0,
        )
    )
    doc = {"threads": args.threads, "workloads": figures, "multi_model_overlap": overlap}
    report.write(args.json, "learner", doc, checks)
    return 0


# ---- multi-model overlap ---------------------------------------------------------------
OVERLAP_IN, OVERLAP_HIDDEN, OVERLAP_OUT, OVERLAP_BATCH = 64, [1024, 1024], 16, 64


def spawn_ranks(
    fn: Callable[..., dict], world: int, *args: Any, timeout_s: float = 300.0, backend: str = "gloo"
) -> list[dict]:
    """Run `fn(rank, world, *args)` in `world` fresh processes joined in a `backend` group on
    this machine, one torch thread each; returns each rank's JSON-able result, in rank order.

    NCCL: rank r uses GPU r (one GPU per rank)."""
    port = free_ports(1)[0]
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(
            _rank_main,
            args=(fn, world, port, out, timeout_s, backend, args),
            nprocs=world,
            start_method="spawn",  # fork would copy this process's torch threads and state
        )
        return [json.loads((Path(out) / f"rank-{r}.json").read_text()) for r in range(world)]


def _rank_main(
    rank: int,
    fn: Callable[..., dict],
    world: int,
    port: int,
    out: str,
    timeout_s: float,
    backend: str,
    args: tuple,
) -> None:
    # One thread per rank: ranks share the machine's cores with each other and gloo.
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=timeout_s),
    )
    try:
        (Path(out) / f"rank-{rank}.json").write_text(json.dumps(fn(rank, world, *args)))
    finally:
        dist.destroy_process_group()
    # Gloo's worker threads can abort the interpreter's teardown ("terminate called without
    # an active exception", about one run in fifteen); the rank's result is written, so the
    # process leaves without that teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def population(models: int, seed: int = 0) -> list[Member]:
    """`models` MLPs with one learning rate each (a small population), identical on every rank."""
    torch.manual_seed(seed)
    out = []
    for k in range(models):
        net = QNetwork(OVERLAP_IN, OVERLAP_OUT, OVERLAP_HIDDEN)
        opt = torch.optim.Adam(net.parameters(), lr=1e-4 * (k + 1))
        out.append(Member(net, opt, _regression_loss, max_grad_norm=10.0))
    return out


def _regression_loss(net: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.smooth_l1_loss(net(x), y)


def _overlap_rank(rank: int, world: int, models: int, seconds: float) -> dict:
    g = torch.Generator().manual_seed(1000 + rank)  # each rank its own batches
    batches = [
        (
            torch.randn(OVERLAP_BATCH, OVERLAP_IN, generator=g),
            torch.randn(OVERLAP_BATCH, OVERLAP_OUT, generator=g),
        )
        for _ in range(models)
    ]
    trainer = OverlapTrainer(population(models))
    for overlap in (False, True):  # warm-up (allocations, gloo connections)
        for _ in range(2):
            trainer.step(batches, overlap)
    # Every rank must run the same number of steps: rank 0 sizes the window, all agree.
    start = time.perf_counter()
    for _ in range(3):
        trainer.step(batches, overlap=False)
    per_step = torch.tensor([(time.perf_counter() - start) / 3])
    dist.broadcast(per_step, src=0)
    steps = max(3, int(seconds / 2 / per_step.item()))
    elapsed = {False: 0.0, True: 0.0}
    for _ in range(2):  # alternate, so drift in machine load hits both schedules alike
        for overlap in (False, True):
            dist.barrier()
            start = time.perf_counter()
            for _ in range(steps):
                trainer.step(batches, overlap)
            elapsed[overlap] += time.perf_counter() - start
    updates = 2 * steps * models  # model updates each schedule made on this rank
    return {"sequential": updates / elapsed[False], "overlapped": updates / elapsed[True], "steps": steps}


def overlap_gain(models: int, ranks: int, seconds: float) -> dict:
    """Model updates/s of one rank, sequential vs overlapped all-reduce, and their ratio."""
    results = spawn_ranks(_overlap_rank, ranks, models, seconds)
    seq = min(r["sequential"] for r in results)  # the group moves at its slowest rank's pace
    ovl = min(r["overlapped"] for r in results)
    params = sum(p.numel() for p in QNetwork(OVERLAP_IN, OVERLAP_OUT, OVERLAP_HIDDEN).parameters())
    return {
        "backend": "gloo",
        "ranks": ranks,
        "models": models,
        "model": f"mlp {OVERLAP_IN}->{OVERLAP_HIDDEN}->{OVERLAP_OUT}",
        "params_per_model": params,
        "batch": OVERLAP_BATCH,
        "steps_per_schedule": 2 * results[0]["steps"],
        "sequential_updates_per_s": round(seq, 1),
        "overlapped_updates_per_s": round(ovl, 1),
        "gain": round(ovl / seq, 3),
    }
