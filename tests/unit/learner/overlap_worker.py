"""Rank bodies for tests/unit/learner/test_overlap.py, run in spawned gloo processes.

Each returns a JSON-able dict (cluster/bench/learner.py `spawn_ranks` collects them).
"""

from __future__ import annotations

import copy
import json

import torch
import torch.distributed as dist

from canopy.cluster.bench.learner import OVERLAP_IN, OVERLAP_OUT, population
from canopy.config import LearnerConfig
from canopy.envs import EnvSpec
from canopy.learner import algorithms
from canopy.learner.algorithms.dqn import DQN, Batch
from canopy.learner.algorithms.td3 import TD3
from canopy.learner.group import LearnerGroup, params_digest
from canopy.learner.network import QNetwork
from canopy.learner.overlap import GradSync, OverlapTrainer

MODELS, STEPS, BATCH = 3, 4, 16


def _batches(rank: int, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(100 * rank + step)
    return [
        (torch.randn(BATCH, OVERLAP_IN, generator=g), torch.randn(BATCH, OVERLAP_OUT, generator=g))
        for _ in range(MODELS)
    ]


def _flat(trainer: OverlapTrainer) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for m in trainer.members for p in m.model.parameters()])


def overlap_vs_sequential(rank: int, world: int, bucket_mb: float) -> dict:
    """Train the same population both ways on this rank's batches; compare the results."""
    members = population(MODELS)
    seq = OverlapTrainer(copy.deepcopy(members), bucket_mb=bucket_mb)
    ovl = OverlapTrainer(copy.deepcopy(members), bucket_mb=bucket_mb)
    # Reference without any group: every rank's batches at once. With equal batch sizes the
    # mean of the ranks' mean-loss gradients is the gradient of the mean loss over all of them.
    ref = copy.deepcopy(members)
    for step in range(STEPS):
        seq.step(_batches(rank, step), overlap=False)
        ovl.step(_batches(rank, step), overlap=True)
        every = [_batches(r, step) for r in range(world)]
        for k, m in enumerate(ref):
            x = torch.cat([b[k][0] for b in every])
            y = torch.cat([b[k][1] for b in every])
            loss = m.loss(m.model, (x, y))
            m.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.model.parameters(), m.max_grad_norm)
            m.optimizer.step()
    a, b = _flat(seq), _flat(ovl)
    r = torch.cat([p.detach().reshape(-1) for m in ref for p in m.model.parameters()])
    gathered = [torch.empty_like(b) for _ in range(world)]
    dist.all_gather(gathered, b)
    return {
        "bitwise_equal": bool(torch.equal(a, b)),
        "ranks_equal": all(torch.equal(gathered[0], t) for t in gathered),
        "max_abs_diff_to_reference": float((b - r).abs().max()),
        "moved": float((b - _flat(OverlapTrainer(members))).abs().max()),
    }


def group_collectives(rank: int, world: int) -> dict:
    """LearnerGroup's control flags, broadcast and gather, over the default gloo group."""
    group = LearnerGroup(rank, world, epoch=7, device=torch.device("cpu"))
    halt, ckpt = group.control(stop=rank == 1, checkpoint=True)  # only rank 0's request counts
    calm = group.control(stop=False, checkpoint=rank == 1)
    payload = json.dumps({"from": 0, "data": list(range(1000))}).encode() if rank == 0 else None
    got = group.broadcast_bytes(payload)
    parts = group.gather_bytes(f"rank {rank} ".encode() * (rank + 1))
    empty = group.broadcast_bytes(b"" if rank == 0 else None)
    return {
        "halt": halt,
        "ckpt": ckpt,
        "calm": list(calm),
        "broadcast": json.loads(got)["data"][-1],
        "parts": [p.decode() for p in parts],
        "empty": empty.decode(),
    }


def nccl_overlap(rank: int, world: int) -> dict:
    """The CUDA path: overlapped vs sequential on GPU tensors, and the group's collectives."""
    device = torch.device("cuda", rank)
    members = population(MODELS)
    for m in members:
        m.model.to(device)
    seq = OverlapTrainer(copy.deepcopy(members))
    ovl = OverlapTrainer(copy.deepcopy(members))
    for step in range(STEPS):
        batches = [(x.to(device), y.to(device)) for x, y in _batches(rank, step)]
        seq.step(batches, overlap=False)
        ovl.step(batches, overlap=True)
    group = LearnerGroup(rank, world, epoch=1, device=device)
    halt, ckpt = group.control(stop=False, checkpoint=True)
    got = group.broadcast_bytes(b"nccl" if rank == 0 else None)
    parts = group.gather_bytes(bytes([rank]) * 3)
    return {
        "bitwise_equal": bool(torch.equal(_flat(seq), _flat(ovl))),
        "flags": [halt, ckpt],
        "broadcast": got.decode(),
        "parts": [list(p) for p in parts],
    }


def _cartpole_batch(g: torch.Generator, n: int) -> Batch:
    """n random 4-dim observation transitions with 2 actions."""
    return Batch(
        torch.randn(n, 4, generator=g),
        torch.randint(0, 2, (n,), generator=g),
        torch.randn(n, generator=g),
        torch.randn(n, 4, generator=g),
        torch.full((n,), 0.9),
    )


def algorithms_in_step(rank: int, world: int) -> dict:
    """DQN and TD3 with the learner's GradSync hook, each rank on its own batches."""
    torch.manual_seed(0)  # same initial networks on every rank, as the learner's broadcast gives
    dqn = DQN(QNetwork(4, 2, [32]), LearnerConfig(hidden=[32], lr=1e-2, target_update_period=3))
    td3 = TD3(3, 1, LearnerConfig(hidden=[16], lr=1e-2, policy_delay=2))
    dqn.grad_sync = td3.grad_sync = GradSync()
    g = torch.Generator().manual_seed(rank)
    for _ in range(5):
        n = 16
        dqn.update(_cartpole_batch(g, n))
        td3.update(
            Batch(
                torch.randn(n, 3, generator=g),
                torch.rand(n, 1, generator=g) * 2 - 1,
                torch.randn(n, generator=g),
                torch.randn(n, 3, generator=g),
                torch.full((n,), 0.9),
            )
        )
    return {"dqn": params_digest(dqn.online), "td3": params_digest(td3.online), "updates": dqn.updates}


def population_in_step(rank: int, world: int) -> dict:
    """A DQN population (learner/algorithms/population.py) in a group: overlapped, on each rank's batches."""
    torch.manual_seed(0)  # same initial networks on every rank, as the learner's broadcast gives
    cfg = LearnerConfig(hidden=[32], models=2, model_lr=[1e-2, 3e-2], target_update_period=3)
    pop = algorithms.make(EnvSpec((4,), "float32", 2, True), cfg, torch.device("cpu")).algorithm
    before = params_digest(pop.online)
    g = torch.Generator().manual_seed(rank)
    for _ in range(5):
        pop.update([_cartpole_batch(g, 16) for _ in range(2)])
    return {
        "digest": params_digest(pop.online),
        "moved": params_digest(pop.online) != before,
        "updates": pop.updates,
    }
