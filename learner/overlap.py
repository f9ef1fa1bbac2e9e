"""Gradient averaging for a data-parallel learner group, and overlapping it across models.

Place in the data flow: learner update -> `loss.backward()` -> here (the ranks' gradients
are summed with one all-reduce per bucket and divided by the group size) -> gradient
clipping -> optimizer step. Every rank then holds the same mean gradient and steps the same
optimizer state, so the ranks' parameters stay identical without ever being broadcast again.

Two users:

- A learner group (`learner.learners > 1`): once the group is formed, the learner role
  calls the algorithm's `join_group` (learner/algorithms/base.py), which installs
  `GradSync` as the hook it calls after each backward pass (learner/algorithms/dqn.py,
  td3.py).
- A group that trains several models at once (`OverlapTrainer`, e.g. a small population
  with different learning rates): while model k's gradients are being all-reduced
  (`async_op=True`), the ranks compute model k+1's gradients; each model steps once its own
  reduction has finished. The sequential schedule (backward, blocking all-reduce, step, one
  model after another) is kept beside it as the baseline (`canopy bench learner`).

Gradients travel flattened: the grads of one model are packed into buckets of at most
`bucket_mb` (one dtype per bucket), so a model costs a few large messages instead of one per
parameter tensor. Parameters without a gradient (a TD3 critic step leaves the actor's None)
are skipped; the same code path runs on every rank, so every rank skips the same ones.
Works with NCCL (tensors on the rank's GPU) and gloo (CPU): gloo has no AVG reduction, so
the mean is a SUM followed by a division, the same on both.

Example:
    trainer = OverlapTrainer([Member(net, opt, loss_fn) for net, opt in models])
    losses = trainer.step(batches, overlap=True)  # one update of every model, same on every rank
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from canopy.errors import CanopyError

DEFAULT_BUCKET_MB = 25.0  # torch DDP's default bucket size


class GroupLost(CanopyError):
    """A collective failed: a rank of the learner group died, or the group timed out."""


def buckets(params: Iterable[nn.Parameter], bucket_bytes: int) -> list[list[torch.Tensor]]:
    """The gradients of `params` (None skipped), grouped by dtype into buckets of <= bucket_bytes.

    A single gradient larger than the bucket size gets a bucket of its own.
    """
    out: list[list[torch.Tensor]] = []
    open_by_dtype: dict[tuple[torch.dtype, torch.device], tuple[list[torch.Tensor], int]] = {}
    for p in params:
        g = p.grad
        if g is None:
            continue
        key = (g.dtype, g.device)
        bucket, size = open_by_dtype.get(key, ([], 0))
        nbytes = g.numel() * g.element_size()
        if bucket and size + nbytes > bucket_bytes:
            out.append(bucket)
            bucket, size = [], 0
        bucket.append(g)
        open_by_dtype[key] = (bucket, size + nbytes)
    out += [bucket for bucket, _ in open_by_dtype.values() if bucket]
    return out


class PendingReduce:
    """All-reduces in flight for one model's gradients; `wait()` writes the means back."""

    def __init__(self, flats: list[tuple[torch.Tensor, list[torch.Tensor], Any]], world: int):
        self.flats = flats
        self.world = world

    def wait(self) -> None:
        """Finish the reductions and leave each gradient as the group's mean; GroupLost on failure."""
        try:
            for flat, grads, work in self.flats:
                if work is not None:
                    work.wait()
                flat.div_(self.world)
                # Copy the mean back into each .grad (views of `flat` would be replaced by the
                # next backward pass anyway; a copy keeps the optimizer's tensors unchanged).
                means = flat.split([g.numel() for g in grads])
                for g, mean in zip(grads, means, strict=True):
                    g.copy_(mean.view_as(g))
        except RuntimeError as exc:  # gloo and NCCL report a dead peer or a timeout this way
            raise GroupLost(f"gradient all-reduce failed: {exc}") from None


def allreduce_grads(
    params: Iterable[nn.Parameter],
    group: dist.ProcessGroup | None = None,
    async_op: bool = False,
    bucket_mb: float = DEFAULT_BUCKET_MB,
) -> PendingReduce:
    """Start summing the gradients of `params` across the group; `.wait()` leaves the means.

    With `async_op=False` the reductions have finished when this returns (wait() still has
    to be called, to divide and copy back). Outside an initialised group (one process) the
    gradients are left as they are.
    """
    if not dist.is_available() or not dist.is_initialized():
        return PendingReduce([], 1)
    world = dist.get_world_size(group)
    flats = []
    try:
        for grads in buckets(params, int(bucket_mb * 2**20)):
            flat = torch.cat([g.reshape(-1) for g in grads])
            work = dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group, async_op=async_op)
            flats.append((flat, grads, work))
    except RuntimeError as exc:
        raise GroupLost(f"gradient all-reduce failed: {exc}") from None
    return PendingReduce(flats, world)


class GradSync:
    """The hook an algorithm calls after backward: average the gradients over the group now.

    Example:
        self.grad_sync = GradSync()  # the algorithm's join_group, once the process group is up
    """

    def __init__(self, group: dist.ProcessGroup | None = None, bucket_mb: float = DEFAULT_BUCKET_MB):
        self.group = group
        self.bucket_mb = bucket_mb

    def __call__(self, params: Iterable[nn.Parameter]) -> None:
        allreduce_grads(params, self.group, async_op=False, bucket_mb=self.bucket_mb).wait()


class Trainable(Protocol):
    """What `OverlapTrainer` drives: a model whose update splits around the gradient average."""

    def backward(self, batch: Any) -> Any:
        """Loss and gradients on `batch`; returns the stats."""

    def params(self) -> Iterable[nn.Parameter]:
        """The parameters whose gradients are averaged."""

    def apply(self) -> None:
        """Clip, step and bookkeeping, once the gradients are averaged."""


@dataclass
class Member:
    """One plain model of a group trained together: network, optimizer and loss on a batch.

    (A DQN (learner/algorithms/dqn.py) is `Trainable` by itself.)
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss: Callable[[nn.Module, Any], torch.Tensor]
    max_grad_norm: float | None = None  # clipped after averaging, so every rank clips alike

    def backward(self, batch: Any) -> torch.Tensor:
        """Fresh gradients of the loss on `batch`; returns the loss, detached."""
        loss = self.loss(self.model, batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return loss.detach()

    def params(self) -> Iterable[nn.Parameter]:
        """The model's parameters."""
        return self.model.parameters()

    def apply(self) -> None:
        """Clip (when `max_grad_norm` is set) and step the averaged gradients."""
        if self.max_grad_norm is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()


class OverlapTrainer:
    """One update of each of several models per `step`, with their all-reduces overlapped.

    Both schedules apply exactly the same operations to each model (same buckets, same sum,
    same division, same clipping, same step), so they give the same parameters; overlap
    only changes when the rank waits.
    """

    def __init__(
        self,
        members: Sequence[Trainable],
        group: dist.ProcessGroup | None = None,
        bucket_mb: float = DEFAULT_BUCKET_MB,
    ):
        if not members:
            raise ValueError("OverlapTrainer needs at least one model")
        self.members = list(members)
        self.group = group
        self.bucket_mb = bucket_mb

    def step(self, batches: Sequence[Any], overlap: bool = True) -> list[Any]:
        """Update every model once on its batch; returns what each `backward` returned."""
        if len(batches) != len(self.members):
            raise ValueError(f"step got {len(batches)} batches for {len(self.members)} models")
        outs = []
        pending: tuple[Trainable, PendingReduce] | None = None
        for member, batch in zip(self.members, batches, strict=True):
            outs.append(member.backward(batch))
            reduce = allreduce_grads(member.params(), self.group, overlap, self.bucket_mb)
            if not overlap:
                self._finish(member, reduce)
                continue
            # Model k's reduction has been running while this model's backward pass ran:
            # finish k now and leave this one's reduction in flight behind the next backward.
            if pending is not None:
                self._finish(*pending)
            pending = (member, reduce)
        if pending is not None:
            self._finish(*pending)
        return outs

    @staticmethod
    def _finish(member: Trainable, reduce: PendingReduce) -> None:
        reduce.wait()
        member.apply()
