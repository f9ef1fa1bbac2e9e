"""Learners' side of replay: a SampleClient streams sampled batches from every live shard.

Place in the data flow: the learner (learner/role.py) iterates `tensor_batches`; the
SampleClient keeps several sample requests in flight on each live shard (so a batch is
usually already waiting when the training step asks), draws each batch from a shard by
its share of total priority, and hands it over as numpy arrays or as torch tensors on the
learner's device; new priorities go back through `update_priorities`. It takes either
fixed endpoints (tests, benchmarks) or a `Members` view that follows Redis
(replay/membership.py). Headers come from replay/protocol.py; the shard's side is
replay/server.py.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgpack
import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from canopy import wire
from canopy.errors import DeadlineExceeded, ProtocolError
from canopy.replay import protocol
from canopy.replay.connect import STOP_CHECK_S, dealer
from canopy.replay.membership import Members
from canopy.replay.packed import FRAMES, LAYOUT, StackPool, Unpacker, rebuild
from canopy.replay.protocol import BatchReply

if TYPE_CHECKING:
    import torch

TRAIN_FIELDS = ("obs", "action", "reward", "next_obs", "discount", "weight")
# Replies up to about this size carry several batches: per-message costs (a header, socket
# calls, a wake-up of each side's ZeroMQ thread) then count once for several small batches.
GROUP_BYTES = 2**20
Ready = deque[tuple[BatchReply, dict[str, np.ndarray]]]  # a shard's received batches, one each


@dataclass
class _Shard:
    endpoint: str
    sock: zmq.Socket
    awaited: bool  # a member when the client started: the first draw waits for its total
    ready: Ready = field(default_factory=deque)
    asked: dict[int, int] = field(default_factory=dict)  # request id -> batches, in flight
    owed: int = 0  # batches to ask for: ready + asked + owed == the client's `inflight`
    total: float = 0.0  # latest sampling-weight total the shard reported; 0: not sampleable now
    size: int = 0
    min_weight: float = 0.0
    heard: bool = False  # answered at least once: its total is known (0 when not ready)
    # Reports the connection dropping: the shard process died, and the requests it held
    # died with it (see `SampleClient._restarted`).
    monitor: zmq.Socket = field(init=False)

    def __post_init__(self) -> None:
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)

    def close(self) -> None:
        self.sock.disable_monitor()
        self.monitor.close(0)
        self.sock.close(0)


@dataclass
class TensorBatch:
    """One batch: the training fields as tensors on the learner's device, every field as numpy.

    `arrays` keeps what stays on the host: `shard`, `slot`, `gen` (the items' addresses for
    `update_priorities`), `prob`, `global_size`, `version`, ...
    """

    tensors: dict[str, torch.Tensor]
    arrays: dict[str, np.ndarray]


class SampleClient:
    """Streams batches from every live shard, `inflight` requests outstanding per shard.

    Global prioritisation: each batch comes whole from one shard, picked with probability
    total_s / sum(total) (the shard's share of total priority; its item count for uniform
    tables), so an item's chance to be in a batch is w_i / sum(total) whichever shard holds
    it. Every batch carries `shard` (the shard id), `slot`, `gen` (its items' addresses for
    `update_priorities`), `prob` (global probability) and `weight` (importance weight
    (N P_i)^-beta normalised by the largest possible weight in the whole cluster), and
    `global_size` (N). beta anneals linearly from `is_exponent` to `is_exponent_final`.

    Requests: at most `inflight` batches are asked for or waiting per shard, never more, so
    nothing is sampled unused. Small batches travel several to a reply (up to GROUP_BYTES a
    reply and `inflight` // 2 batches, so a second request is always in flight): each is its
    own draw of `batch` items, the same as that many single requests in flight would get.
    Pixel batches travel as frames plus indexes (replay/packed.py); when handed out, their
    stacks are views on the received frames (one-step transitions: obs and next_obs of an
    item share memory) or rebuilt into pooled buffers.

    Fencing: every priority update carries `epoch`, the learner's lease epoch; a shard that
    has seen a newer epoch drops it (replay/shard.py: EpochFence).

    Membership: with a `Members` view the client follows the live set. A shard that leaves
    is dropped with the batches it had sent (they belong to a draw over a set of shards that
    no longer exists); a shard that joins enters the draw once it has reported its total.
    Every batch's `prob`, `weight` and `global_size` are those of the set it was drawn from.

    Example:
        sampler = SampleClient(["tcp://127.0.0.1:5555"], batch=256, inflight=4)
        for batch in sampler.tensor_batches("cpu", timeout=30):
            loss = train_step(batch.tensors)
            a = batch.arrays
            sampler.update_priorities(a["shard"][0], a["slot"], a["gen"], td_abs)
    """

    def __init__(
        self,
        target: Sequence[str] | Members,
        batch: int,
        inflight: int,
        max_frame: int = protocol.SAMPLE_MAX_FRAME,
        table: str | None = None,
        is_exponent: float = 0.4,
        is_exponent_final: float = 1.0,
        anneal_batches: int = 100_000,
        seed: int = 0,
        epoch: int = 0,
    ) -> None:
        self.epoch = epoch  # the learner's lease epoch: shards drop priority updates of older ones
        self.members = target if isinstance(target, Members) else Members(target)
        self.ctx = zmq.Context.instance()
        self.batch = batch
        self.inflight = inflight
        self.max_frame = max_frame
        self.table = table
        self.beta0, self.beta1, self.anneal = is_exponent, is_exponent_final, max(1, anneal_batches)
        self.shards: dict[int, _Shard] = {}
        self.by_sock: dict[int, int] = {}  # id(socket) -> shard id
        self.by_monitor: dict[int, int] = {}  # id(monitor socket) -> shard id
        self.poller = zmq.Poller()
        self.req = itertools.count()
        self.rng = np.random.default_rng(seed)
        self.generation = -1
        self.batches = 0
        self.not_ready_total = 0
        self.shard_changes_total = 0
        self.priority_updates_dropped_total = 0
        self.unpack = Unpacker()  # packed replies (replay/packed.py) -> named arrays
        self.stacks = StackPool()  # where unique-frame batches are rebuilt
        self.group_max = max(1, inflight // 2)
        self.group = 1  # batches per request: set from the first reply's size
        self.bytes_received_total = 0  # reply bytes as they came over the wire
        self._follow()

    @property
    def beta(self) -> float:
        """The importance-sampling exponent now, annealed linearly over `anneal_batches` batches."""
        frac = min(1.0, self.batches / self.anneal)
        return self.beta0 + (self.beta1 - self.beta0) * frac

    def tensor_batches(
        self,
        device: torch.device | str,
        timeout: float,
        stop: threading.Event | None = None,
        names: Sequence[str] = TRAIN_FIELDS,
    ) -> Iterator[TensorBatch]:
        """Batches for a training loop, `names` as tensors on `device` (see `to_tensors`).

        Each batch waits at most `timeout` s; past it the iterator raises DeadlineExceeded.
        It ends once `stop` is set, even mid-wait.
        """
        while (arrays := self.next(timeout, stop)) is not None:
            yield TensorBatch(to_tensors(arrays, device, names), arrays)

    def next(self, timeout: float, stop: threading.Event | None = None) -> dict[str, np.ndarray] | None:
        """The next batch as numpy arrays, from a shard drawn by its share of total priority.

        Returns None once `stop` is set, so a stopping learner never waits out `timeout` on
        shards whose rate limiters hold it back (the actors stop first).
        """
        deadline = time.monotonic() + timeout
        while True:
            if stop is not None and stop.is_set():
                return None
            self._follow()
            if not all(s.ready for s in self.shards.values()):  # else: no poll, the queue waits
                self._receive(0)
            drawable = {sid: s for sid, s in self.shards.items() if s.heard and s.total > 0}
            # The first draw needs the total of every shard there was at the start.
            waiting = any(s.awaited and not s.heard for s in self.shards.values())
            if drawable and not waiting:
                sid = self._draw(drawable)
                shard = drawable[sid]
                # The draw must not depend on which shard happens to have a batch ready: wait
                # for this one until it serves, its limiter holds it, or it leaves.
                while not shard.ready and shard.total > 0 and self.shards.get(sid) is shard:
                    if stop is not None and stop.is_set():
                        return None
                    self._receive(self._slice_ms(deadline, timeout))
                    self._follow()
                if shard.ready and shard.total > 0 and self.shards.get(sid) is shard:
                    # Ask again only for what was consumed: batches asked for plus batches
                    # waiting stay at `inflight` per shard, so nothing is sampled unused
                    # (which would also fool the shard's samples-per-insert limiter).
                    shard.owed += 1
                    self._top_up(shard)
                    return self._finish(sid, *shard.ready.popleft())
                continue  # the drawn shard went not-ready or left meanwhile: draw again
            self._receive(self._slice_ms(deadline, timeout))

    def _draw(self, drawable: dict[int, _Shard]) -> int:
        """A shard id with probability total_s / sum(total) (no draw for a single shard)."""
        if len(drawable) == 1:
            return next(iter(drawable))
        u = self.rng.random() * sum(s.total for s in drawable.values())
        for sid, s in drawable.items():
            u -= s.total
            if u < 0:
                return sid
        return sid  # rounding left u >= 0 after the last one: it is the last one

    def update_priorities(self, shard: int, slot: np.ndarray, gen: np.ndarray, priority: np.ndarray) -> None:
        """Send new priorities for items of one shard (fire-and-forget; stale ones are dropped there).

        Updates for a shard that has left are dropped here (counted): its items are gone.
        """
        target = self.shards.get(int(shard))
        if target is None:
            self.priority_updates_dropped_total += len(slot)
            return
        header = protocol.priority_request(next(self.req), self.epoch, self.table)
        arrays = protocol.priority_arrays(slot, gen, priority)
        target.sock.send_multipart(wire.encode(header, arrays), copy=False)

    def close(self) -> None:
        """Close every shard's sockets."""
        for s in self.shards.values():
            s.close()

    def _slice_ms(self, deadline: float, timeout: float) -> int:
        """How long the next wait may be: short enough to notice membership changes."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded(
                f"no replay batch within {timeout:.0f}s from shards {sorted(self.shards)}: "
                "check that the shards are up and that actors insert"
            )
        return int(min(remaining, STOP_CHECK_S) * 1000) + 1

    def _follow(self) -> None:
        generation, live = self.members.view
        if generation == self.generation:
            return
        self.generation = generation
        for sid, shard in list(self.shards.items()):
            if live.get(sid) != shard.endpoint:
                self._drop(sid)
        for sid, endpoint in live.items():
            if sid not in self.shards:
                self._add(sid, endpoint)

    def _add(self, sid: int, endpoint: str) -> None:
        sock = dealer(self.ctx, endpoint, self.max_frame)
        shard = self.shards[sid] = _Shard(endpoint, sock, awaited=self.batches == 0, owed=self.inflight)
        self.by_sock[id(sock)] = sid
        self.by_monitor[id(shard.monitor)] = sid
        self.poller.register(sock, zmq.POLLIN)
        self.poller.register(shard.monitor, zmq.POLLIN)
        self._top_up(shard)
        if self.batches:
            self.shard_changes_total += 1

    def _drop(self, sid: int) -> None:
        shard = self.shards.pop(sid)
        self.poller.unregister(shard.sock)
        self.poller.unregister(shard.monitor)
        del self.by_sock[id(shard.sock)]
        del self.by_monitor[id(shard.monitor)]
        shard.close()
        self.shard_changes_total += 1

    def _restarted(self, sid: int) -> None:
        """Replace a shard whose connection dropped with a fresh one on its endpoint.

        A shard restarted within its membership TTL keeps its endpoint, so `_follow` sees
        no change; but the sample requests it held died with the old process and would
        never be answered, and a draw that picked it would wait out the deadline. Treated
        as a leave and a join: its batches go, new requests go to the new process.
        """
        shard = self.shards[sid]
        lost = False
        while shard.monitor.poll(0):
            lost |= recv_monitor_message(shard.monitor)["event"] == zmq.EVENT_DISCONNECTED
        if lost:
            self._drop(sid)
            self._add(sid, shard.endpoint)

    def _receive(self, wait_ms: int) -> None:
        """Take every reply already queued (waiting up to `wait_ms` for the first one).

        Batches wait in their shard's `ready` queue; `next` re-requests as it consumes them.
        """
        for sock, _ in self.poller.poll(wait_ms):
            if id(sock) in self.by_monitor:
                self._restarted(self.by_monitor[id(sock)])
                continue
            if id(sock) not in self.by_sock:
                continue  # its shard was replaced by a restart found earlier in this poll
            shard = self.shards[self.by_sock[id(sock)]]
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                self._take(shard, frames)
            self._top_up(shard)  # a reply with fewer batches than asked

    def _take(self, shard: _Shard, frames: list[zmq.Frame]) -> None:
        """One reply: its batches join the shard's `ready` queue, or its refusal is counted."""
        msg = wire.decode(frames, self.max_frame)
        shard.heard = True
        asked = shard.asked.pop(protocol.request_id(msg.header), 0)
        if msg.op == protocol.Reply.BATCH:
            if not asked:
                raise ProtocolError(f"replay shard {shard.endpoint} answered a request never made")
            h = msg.header
            reply = protocol.parse_batch(h, asked)
            shard.total, shard.size, shard.min_weight = reply.total, reply.size, reply.min_weight
            arrays = self.unpack(h, msg.arrays) if LAYOUT in h else msg.arrays
            nbytes = sum(len(f) for f in frames)
            self.bytes_received_total += nbytes
            self._split(reply, arrays, shard.ready)
            shard.owed += asked - reply.batches  # the limiter allowed fewer: ask again for the rest
            if self.batches == 0 and self.group == 1:  # sized once, by the first reply
                self.group = max(1, min(self.group_max, GROUP_BYTES // max(1, nbytes // reply.batches)))
        elif protocol.error_code(msg.header) in protocol.RETRY:
            shard.owed += asked  # nothing was delivered: keep the request count up
            self.not_ready_total += 1
            shard.total = 0.0  # held by its limiter: not drawn until it serves again
        else:
            raise ProtocolError(f"replay shard refused a sample: {protocol.error_message(msg.header)}")

    @staticmethod
    def _split(reply: BatchReply, arrays: dict[str, np.ndarray], ready: Ready) -> None:
        """Queue a reply's batches, each as views on its rows (a unique-frame reply's frames
        are shared: every batch's indexes name frames in the whole of them)."""
        batches = reply.batches
        if batches == 1:
            ready.append((reply, arrays))
            return
        rows = {k: a for k, a in arrays.items() if k != FRAMES}
        n = len(next(iter(rows.values())))
        if n % batches:
            raise ProtocolError(f"replay shard sent {n} rows for {batches} batches")
        step = n // batches
        for i in range(0, n, step):
            batch = {k: a[i : i + step] for k, a in rows.items()}
            if FRAMES in arrays:
                batch[FRAMES] = arrays[FRAMES]
            ready.append((reply, batch))

    def _finish(self, sid: int, reply: BatchReply, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = rebuild(dict(arrays), self.stacks)
        live = [s for s in self.shards.values() if s.total > 0]
        total = sum(s.total for s in live)
        size = sum(s.size for s in live)
        # The item's own weight w_i = prob * (its shard's total when it was drawn).
        prob = arrays["prob"] * reply.total / total
        p_min = min(s.min_weight for s in live) / total
        beta = self.beta
        # (N P_i)^-beta / (N P_min)^-beta: N cancels; the largest weight belongs to P_min.
        out["prob"] = prob
        out["weight"] = (np.minimum(p_min / prob, 1.0) ** beta).astype(np.float32)
        out["shard"] = np.full(len(prob), sid, np.int64)
        out["global_size"] = np.asarray(size, np.int64)
        self.batches += 1
        return out

    def _top_up(self, shard: _Shard) -> None:
        """Ask for owed batches, `group` a request; fewer only when nothing else is in flight."""
        while shard.owed >= self.group or (shard.owed and not shard.asked):
            k = min(self.group, shard.owed)
            req = next(self.req)
            header = protocol.sample_request(self.batch, req, batches=k, table=self.table)
            shard.sock.send(msgpack.packb(header))  # a header-only wire.py message, one frame
            shard.asked[req] = k
            shard.owed -= k


def to_tensors(
    arrays: dict[str, np.ndarray], device: torch.device | str, names: Sequence[str] = TRAIN_FIELDS
) -> dict[str, torch.Tensor]:
    """The named arrays as torch tensors on `device`, with at most one host copy.

    CPU: `torch.from_numpy` views the received frames themselves (zero-copy; frames taken
    with copy=False are this process's own writable memory). CUDA: one copy into page-locked
    memory, then an asynchronous copy to the GPU that overlaps the previous step's kernels;
    the pinned blocks come from torch's caching host allocator, which does not hand a block
    out again before the copy reading it has finished.
    """
    import torch  # here, not at the top: actors import this module (via replay/client.py), never torch

    device = torch.device(device)
    out = {}
    for name in names:
        a = arrays[name]
        t = torch.from_numpy(a if a.flags.writeable else a.copy())
        out[name] = t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)
    return out
