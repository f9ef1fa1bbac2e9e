"""The data-parallel learner group (`learner.learners = N`): rendezvous and control collectives.

Place in the data flow: learner start -> (rank 0) lease -> restore -> `form` / (ranks
1..N-1) `join` -> `broadcast_bytes` of rank 0's whole training state -> per update: one
`control` all-reduce (stop? checkpoint now?), each rank samples its own batch, gradients
averaged (learner/overlap.py) -> identical steps on every rank -> rank 0 publishes.

Who is who. Learner ids 1..N-1 are followers: they always run rank = id, never take the
lease, never publish or commit a checkpoint. Rank 0 is whichever learner holds the lease:
id 0, or the warm standby (id N) after a failover. The group lives exactly as long as one
lease epoch: rank 0 takes the lease (a new epoch), serves a TCPStore on
`cluster.learner_store` (host:port; `canopy up` picks a free port) and writes the record
`learner:group` {epoch, store, world} into Redis; followers wait for a record whose epoch
is the lease's current epoch and join through it, every key of the rendezvous under a
prefix of that epoch, so a stale follower can never join a newer group. Any failed
collective (a rank died, or was silent past the group timeout) ends the group: every rank
stops, rank 0 lets its lease lapse, `canopy up` restarts the dead ones (followers as
followers), and the next lease holder forms the group again under a new epoch from the
newest checkpoint, so the group fails over as a unit.

Backend: NCCL when the learner trains on CUDA (rank r uses GPU r % device_count, so one
host with N GPUs runs N ranks), gloo on CPU. Control messages ride on the same backend
(CUDA tensors for NCCL).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import redis
import torch
import torch.distributed as dist

from canopy.errors import UserError
from canopy.keys import Keys
from canopy.learner.overlap import GroupLost
from canopy.lease import parse_token

JOIN_POLL_S = 0.2
CONNECT_TIMEOUT_S = 10.0  # one try of a follower to reach rank 0's store


def store_address(address: str) -> tuple[str, int]:
    """`host:port` -> (host, port); a one-line UserError when it is not one."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(
            f"cluster.learner_store = {address!r}: learner.learners > 1 needs host:port, the "
            "address rank 0 serves the group's rendezvous on (canopy up fills it in)"
        )
    return host, int(port)


class LearnerGroup:
    """This process's membership of the group: its rank and the collectives the loop uses.

    Example:
        group = LearnerGroup.form(r, keys, epoch, "10.0.0.3:29500", 2, device, stop, timeout)
        halt, ckpt = group.control(stop=False, checkpoint=due)
    """

    def __init__(self, rank: int, world: int, epoch: int, device: torch.device):
        self.rank, self.world, self.epoch = rank, world, epoch
        # NCCL only moves CUDA tensors; gloo moves CPU tensors.
        self.device = device if device.type == "cuda" else torch.device("cpu")

    @classmethod
    def form(
        cls,
        r: redis.Redis,
        keys: Keys,
        epoch: int,
        address: str,
        world: int,
        device: torch.device,
        stop: threading.Event,
        timeout_s: float,
    ) -> LearnerGroup:
        """Rank 0: serve the rendezvous, announce it for this epoch, wait for every follower."""
        host, port = store_address(address)
        while True:
            try:
                # Binds every interface; a previous rank 0 (fenced, paused) may still hold the
                # port for a moment, so keep trying while this learner holds the lease.
                store = dist.TCPStore(
                    host,
                    port,
                    world,
                    is_master=True,
                    timeout=timedelta(seconds=timeout_s),
                    wait_for_workers=False,
                )
                break
            except (RuntimeError, OSError):
                if stop.wait(JOIN_POLL_S):
                    raise GroupLost("stopped before the group's store could be served") from None
        r.hset(keys.learner_group, mapping={"epoch": epoch, "store": address, "world": world})
        return cls._init(store, epoch, 0, world, device, timeout_s)

    @classmethod
    def join(
        cls,
        r: redis.Redis,
        keys: Keys,
        rank: int,
        world: int,
        device: torch.device,
        stop: threading.Event,
        timeout_s: float,
    ) -> LearnerGroup:
        """Follower: wait for the current epoch's group record and join it as `rank`."""
        while not stop.wait(JOIN_POLL_S):
            try:
                lease = r.get(keys.lease)
                record = {k.decode(): v.decode() for k, v in r.hgetall(keys.learner_group).items()}
            except redis.ConnectionError:
                continue  # the root shard restarts; the lease holder will write the record again
            held = parse_token(lease)
            if held is None or not record:
                continue
            epoch = held[0]
            if int(record.get("epoch", -1)) != epoch:
                continue  # a record of an earlier group: its rank 0 is gone
            if int(record["world"]) != world:
                raise UserError(
                    f"learner group of epoch {epoch} has {record['world']} ranks but this "
                    f"learner's config says learner.learners = {world}"
                )
            host, port = store_address(record["store"])
            try:
                store = dist.TCPStore(
                    host, port, world, is_master=False, timeout=timedelta(seconds=CONNECT_TIMEOUT_S)
                )
                return cls._init(store, epoch, rank, world, device, timeout_s)
            except (RuntimeError, OSError, GroupLost):
                if dist.is_initialized():
                    dist.destroy_process_group()
                continue  # rank 0 of that epoch is not serving (yet, or any more)
        raise GroupLost("stopped before joining a learner group")

    @classmethod
    def _init(
        cls, store: dist.Store, epoch: int, rank: int, world: int, device: torch.device, timeout_s: float
    ) -> LearnerGroup:
        backend = "nccl" if device.type == "cuda" else "gloo"
        try:
            dist.init_process_group(
                backend,
                store=dist.PrefixStore(f"canopy-epoch-{epoch}", store),
                rank=rank,
                world_size=world,
                timeout=timedelta(seconds=timeout_s),
                **({"device_id": device} if backend == "nccl" else {}),
            )
        except (RuntimeError, ValueError) as exc:
            raise GroupLost(f"learner group of epoch {epoch} did not form: {exc}") from None
        return cls(rank, world, epoch, device)

    def control(self, stop: bool, checkpoint: bool) -> tuple[bool, bool]:
        """One small all-reduce per update: (does any rank stop?, does rank 0 checkpoint now?).

        Every rank calls it exactly once per loop iteration, before its update, so a rank
        that stops (signal, lost lease, no more batches) takes every other rank with it at
        the same update count, and a checkpoint's per-rank state is gathered at one step.
        """
        flags = torch.tensor([int(stop), int(checkpoint and self.rank == 0)], device=self.device)
        self._collective(dist.all_reduce, flags)
        halt, ckpt = flags.tolist()
        return halt > 0, ckpt > 0

    def broadcast_bytes(self, payload: bytes | None) -> bytes:
        """Rank 0's `payload` on every rank (others pass None)."""
        size = torch.tensor([len(payload) if payload is not None else 0], device=self.device)
        self._collective(dist.broadcast, size, src=0)
        if payload:
            buf = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(self.device)
        else:
            buf = torch.empty(int(size.item()), dtype=torch.uint8, device=self.device)
        if buf.numel():
            self._collective(dist.broadcast, buf, src=0)
        return bytes(buf.cpu().numpy())

    def gather_bytes(self, payload: bytes) -> list[bytes]:
        """Every rank's `payload`, in rank order, on every rank (no pickle: padded raw bytes)."""
        size = torch.tensor([len(payload)], device=self.device)
        sizes = [torch.zeros_like(size) for _ in range(self.world)]
        self._collective(dist.all_gather, sizes, size)
        longest = max(int(s.item()) for s in sizes)
        buf = torch.zeros(max(longest, 1), dtype=torch.uint8, device=self.device)
        if payload:
            buf[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(self.device)
        parts = [torch.empty_like(buf) for _ in range(self.world)]
        self._collective(dist.all_gather, parts, buf)
        return [bytes(p[: int(s.item())].cpu().numpy()) for p, s in zip(parts, sizes, strict=True)]

    def close(self) -> None:
        """Leave the group: tear the process group down, if one is up."""
        if dist.is_initialized():
            dist.destroy_process_group()

    def _collective(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except RuntimeError as exc:
            raise GroupLost(f"learner group of epoch {self.epoch}: {exc}") from None


def params_digest(module: torch.nn.Module) -> str:
    """A short digest of every parameter's bytes: equal on every rank while they agree."""
    h = hashlib.blake2b(digest_size=8)
    for p in module.parameters():
        h.update(p.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
