"""`canopy bench learner`: DQN updates/s on this machine, MLP on CartPole batches and the
Nature CNN on Atari batches, on CPU and on CUDA when present.

Place in the data flow: the learner's update step alone (learner/algorithms/dqn.py), fed
ready batches, so the figure is the ceiling the replay service has to keep up with. The
in-run baseline is a bare double-DQN step in plain PyTorch on the same network and batch
(no IS weights, no gradient clipping, no TD-error bookkeeping): the ratio is canopy's
overhead per update.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from rich.progress import Progress
from torch import nn

from cluster.bench import report
from cluster.config import LearnerConfig
from learner.algorithms.dqn import DQN, Batch
from learner.network import NatureCNN, QNetwork

WORKLOADS = {
    # name: (network factory, observation shape, dtype, batch, actions)
    "cartpole_mlp": (lambda: QNetwork(4, 2, [128, 128]), (4,), torch.float32, 256, 2),
    "atari_nature_cnn": (lambda: NatureCNN(4, 6), (4, 84, 84), torch.uint8, 32, 6),
}


def make_batch(shape: tuple[int, ...], dtype: torch.dtype, batch: int, actions: int, device: str) -> Batch:
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
    q = online(b.obs).gather(1, b.action.unsqueeze(1)).squeeze(1)
    with torch.no_grad():
        nxt = target(b.next_obs).gather(1, online(b.next_obs).argmax(1, keepdim=True)).squeeze(1)
        y = b.reward + b.discount * nxt
    loss = nn.functional.smooth_l1_loss(q, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def rate(step, seconds: float, device: str) -> float:
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
    torch.set_num_threads(args.threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    figures: dict[str, dict] = {}
    with Progress(transient=True) as progress:
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
    checks.append(
        report.check(
            "multi-model overlap gain",
            None,
            "x",
            "several models per learner group, async all-reduce overlapped: not implemented yet",
            None,
            False,
        )
    )
    report.write(args.json, "learner", {"threads": args.threads, "workloads": figures}, checks)
    return 0
