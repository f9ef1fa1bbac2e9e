"""The simulated actors of `canopy bench broadcast`: one worker process serves many.

Place: the child side of broadcast.py, started as `python -m canopy.cluster.bench.broadcast_actors
CFG` by broadcast_procs.py, one process per simulated host's share of actors. Every actor
has its own sockets and its own policy object, fed the way its arm says: tree (cache
client on the host's leaf, shared-memory views), pub (one SUB to the bench's PUB socket,
a private copy) or flat (its own Redis GETs, a private copy). The worker talks to the
bench over stdin and stdout, one JSON line per version (see `worker`).

`CANOPY_BENCH_PROFILE=DIR` writes a cProfile dump of each worker to DIR.
"""

from __future__ import annotations

import json
import os
import select
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import redis
import zmq

from canopy.cache import blob
from canopy.config import ClusterConfig
from canopy.keys import Keys
from canopy.redisconn import tls_kwargs
from canopy.version import Version

START_TIMEOUT_S = 120.0  # for every actor of a worker to attach (the bench waits as long)
MAX_SOCKETS = 16_384  # per worker: two per simulated actor
EVENTS, POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)  # plain ints: enum arithmetic is slow here
PROBE = b"probe"  # the PUB arms' join signal, sent until every subscriber heard one
# One arm's actors: given the policy class, the newest version's (ready times, actors on
# the host's shared copy, one policy) once every actor has it, or None while none has.
Step = Callable[[Any], tuple[list, int, object] | None]


def worker(cfg: dict) -> None:
    """Simulated actors: own sockets each, own policy object each; prints ready times.

    Prints {"ready": true} once every actor is attached, then per version
    {"t": [unix time each actor could act], "shared": how many act on the host's copy}.
    Stops when stdin closes.
    """
    from canopy.actors.policy import MLPPolicy

    ctx = zmq.Context.instance()
    ctx.set(zmq.MAX_SOCKETS, MAX_SOCKETS)
    step = {"tree": _tree_actors, "pub": _pub_actors, "flat": _flat_actors}[cfg["mode"]](
        ctx, cfg, cfg["actors"]
    )
    obs = np.zeros((1, 4), np.float32)
    print(json.dumps({"ready": True}), flush=True)
    while True:
        if select.select([sys.stdin], [], [], 0)[0] and not sys.stdin.read(1):
            return
        got = step(MLPPolicy)
        if got is None:
            continue
        times, shared, policy = got
        policy.q_values(obs)  # the new weights really can act
        woke = getattr(step, "woke", None)
        print(json.dumps({"t": times, "shared": shared, "woke": min(woke or times)}), flush=True)


class Readable:
    """Which of thousands of ZeroMQ sockets have a message: epoll on each socket's ZMQ_FD.

    zmq.Poller costs O(sockets) per call and this libzmq's zmq_poll stops working past
    1024 descriptors; epoll costs O(ready). ZMQ_FD only says "look at ZMQ_EVENTS", so each
    candidate is confirmed there, and sockets that did I/O are rechecked with `recheck`.
    """

    def __init__(self, socks: list[zmq.Socket]):
        self.epoll = select.epoll()
        self.by_fd: dict[int, zmq.Socket] = {}
        for s in socks:
            fd = s.getsockopt(zmq.FD)
            self.by_fd[fd] = s
            self.epoll.register(fd, select.EPOLLIN)
        self.pending = set(socks)  # messages may have queued before the first signal

    def recheck(self, socks: list[zmq.Socket]) -> None:
        """Have the next `wait` look at `socks` again: after I/O their FD may not signal what is queued."""
        self.pending.update(socks)

    def wait(self, timeout_s: float) -> list[zmq.Socket]:
        """The sockets with a message; waits up to `timeout_s`, not at all while some are to be rechecked."""
        events = self.epoll.poll(0 if self.pending else timeout_s)
        candidates = self.pending | {self.by_fd[fd] for fd, _ in events}
        self.pending = set()
        return [s for s in candidates if s.getsockopt(EVENTS) & POLLIN]


def _tree_actors(ctx: zmq.Context, cfg: dict, n: int) -> Step:
    from canopy.cache.client import ClientCore, HostWatch

    # One SUB per process to the leaf's landed notifications (cache/client.py HostWatch);
    # each actor keeps its own SUB (beats: liveness and catch-up) and DEALER.
    watch = HostWatch(cfg["endpoints"][1], ctx) if cfg.get("watch", True) else None
    cores = [
        ClientCore(
            [tuple(cfg["endpoints"])],
            ctx,
            request_timeout_s=60,
            parent_timeout_s=30,
            heartbeat_s=1.0,
            name=f"a{i}",
            watch=watch,
        )
        for i in range(n)
    ]
    owner, index = {}, {}
    for i, c in enumerate(cores):
        c.connect()
        index[id(c)] = i
        if watch is not None:
            watch.add(c)
        for s in c.sockets():
            owner[s] = i
    readable = Readable([*owner, *([watch.sub] if watch is not None else [])])
    current = [None] * n
    deadline = time.monotonic() + START_TIMEOUT_S
    woke: list[float] = []

    def pump(timeout_s: float) -> list:
        updates = []
        for sock in readable.wait(timeout_s):
            if watch is not None and sock is watch.sub:
                woke.append(time.time())
                updates += [(index[id(c)], u) for c, u in watch.on_readable()]
                readable.recheck([sock])
                continue
            i = owner[sock]
            update = cores[i].on_readable(sock)
            if update is not None:
                updates.append((i, update))
            readable.recheck(cores[i].sockets())  # more queued, or a request just sent
        return updates

    # Ready once every core had its hello answered and heard a beat: no slow joiners.
    while not all(c.attached for c in cores):
        pump(0.05)
        if time.monotonic() > deadline:
            raise SystemExit(f"{sum(not c.attached for c in cores)} actors never attached")
    next_tick = 0.0

    policies: list = [None] * n  # views on the host's shared copy: cheap to hold them all

    def step(policy_cls: Any) -> tuple[list, int, object] | None:
        nonlocal next_tick
        times, shared, newest = [], 0, None
        woke.clear()
        while len(times) < n:
            for i, update in pump(0.1):
                if current[i] == update.version:
                    continue
                cores[i].acting(update.version)
                policies[i] = policy_cls.from_arrays(update.manifest.arch, update.arrays)
                current[i] = newest = update.version
                times.append(time.time())
                shared += update.shared
            now = time.monotonic()
            if now >= next_tick:
                for c in cores:
                    c.tick()  # heartbeats go out on the fetch socket: recheck it
                    readable.recheck(c.sockets()[1:])
                next_tick = now + 0.25
            if newest is None and not times:
                return None  # nothing yet: let the caller check stdin
        return times, shared, policies[0]

    step.woke = woke  # when this process first heard of the version (per-stage breakdown)
    return step


def _pub_actors(ctx: zmq.Context, cfg: dict, n: int) -> Step:
    owner = {}
    for i in range(n):
        s = ctx.socket(zmq.SUB)
        s.setsockopt(zmq.SUBSCRIBE, b"")
        s.setsockopt(zmq.RCVHWM, 4)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(cfg["endpoints"])
        owner[s] = i
    readable = Readable(list(owner))
    joined: set[zmq.Socket] = set()
    while len(joined) < n:  # the bench probes until every SUB heard one: no slow joiners
        for sock in readable.wait(0.1):
            readable.recheck([sock])
            sock.recv_multipart()
            joined.add(sock)
    current = [None] * n

    def step(policy_cls: Any) -> tuple[list, int, object] | None:
        times, policy = [], None
        while len(times) < n:
            events = readable.wait(0.1)
            if not events and not times:
                return None
            for sock in events:
                readable.recheck([sock])
                i = owner[sock]
                head, data = sock.recv_multipart(copy=False)
                if head.bytes == PROBE:
                    continue
                manifest = blob.Manifest.from_fields(json.loads(head.bytes))
                if current[i] == manifest.version:
                    continue
                arrays = blob.arrays_of(manifest, data.buffer)  # this actor's private copy
                # Only the newest private copy is kept alive: see the module docstring.
                policy = policy_cls.from_arrays(manifest.arch, arrays)
                current[i] = manifest.version
                times.append(time.time())
        return times, 0, policy

    return step


def _flat_actors(ctx: zmq.Context, cfg: dict, n: int) -> Step:
    keys = Keys(cfg["run"])
    pw = Path(cfg["pw"]).read_text()
    tls = tls_kwargs(ClusterConfig(password_file=cfg["pw"], tls=cfg["tls"]))  # its CA beside the password
    conns = [redis.Redis(*cfg["redis"], username="canopy", password=pw, **tls) for _ in range(n)]
    for c in conns:
        c.ping()
    ps = conns[0].pubsub(ignore_subscribe_messages=True)
    ps.subscribe(keys.model_notify)
    while ps.get_message(timeout=0.1) is None and not ps.subscribed:
        pass

    def step(policy_cls: Any) -> tuple[list, int, object] | None:
        msg = ps.get_message(timeout=0.5)
        if msg is None:
            return None
        v = Version.parse(msg["data"])
        times, policy = [], None
        for c in conns:  # one download at a time per worker: Redis serves one at a time anyway
            manifest, chunks = blob.read(c, keys, v)
            policy = None  # one private copy per worker at a time: see the module docstring
            policy = policy_cls.from_arrays(manifest.arch, blob.unpack(manifest, chunks))
            times.append(time.time())
        return times, 0, policy

    return step


if __name__ == "__main__":
    if os.environ.get("CANOPY_BENCH_PROFILE"):  # a directory: one cProfile dump per worker
        import cProfile

        prof = cProfile.Profile()
        try:
            prof.runcall(worker, json.loads(sys.argv[1]))
        finally:
            prof.dump_stats(f"{os.environ['CANOPY_BENCH_PROFILE']}/worker-{os.getpid()}.prof")
    else:
        worker(json.loads(sys.argv[1]))
