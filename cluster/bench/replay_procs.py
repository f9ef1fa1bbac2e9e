"""The processes and data of `canopy bench replay`: synthetic transitions (and r2d2's
sequences), shard and client processes, and the same work without them (raw ZeroMQ, an
in-process numpy ring).

Place: replay.py decides what to measure and judges it; everything here runs it. Each shard
and each client is a process of its own (multiprocessing spawn) talking ZeroMQ on loopback,
as actors and learners do; every measuring client puts (count, seconds, ...) on a queue.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import time
from typing import Any

import numpy as np

from canopy.cluster.bench import harness

CARTPOLE_OBS = (4,)
ATARI_OBS = (4, 84, 84)
# r2d2's sequences as its defaults cut them on CartPoleNoVelocity (canopy/config_defaults.py):
# T = 40 steps of 2-float observations, an LSTM state of 64 units.
SEQUENCE_STEPS, SEQUENCE_OBS, SEQUENCE_STATE = 40, (2,), 64
EPISODE_STEPS = 400  # synthetic Atari episodes: each starts with one extra frame
_FILL_STREAMS = itertools.count(1000)  # frame-key streams of this process's fills
PROC_TIMEOUT_S = 60.0
CTX = mp.get_context("spawn")


def transitions(n: int, obs_shape: tuple[int, ...], dtype: str) -> dict[str, np.ndarray]:
    """`n` synthetic transitions (fixed seed) with observations of `obs_shape` and `dtype`."""
    rng = np.random.default_rng(0)
    obs = (rng.random((n, *obs_shape)) * 255).astype(dtype)
    return {
        "obs": obs,
        "action": np.zeros(n, np.int64),
        "reward": np.ones(n, np.float32),
        "next_obs": obs.copy(),
        "discount": np.full(n, 0.99, np.float32),
        "version": np.zeros(n, np.int64),
    }


def sequences(n: int) -> dict[str, np.ndarray]:
    """`n` synthetic r2d2 sequences, the columns actors/sequence.py cuts, with priorities."""
    from canopy.actors.sequence import FIELDS

    rng = np.random.default_rng(0)
    t, h = SEQUENCE_STEPS, SEQUENCE_STATE
    shapes = {"obs": (t + 1, *SEQUENCE_OBS), "fresh": (), "h0": (h,), "c0": (h,)}
    ints = ("action", "version")
    arrays = {
        k: rng.random((n, *shapes.get(k, (t,)))).astype(np.int64 if k in ints else np.float32) for k in FIELDS
    }
    return arrays | {"priority": rng.random(n) + 0.01}


def _items(kind: str, n: int, obs: tuple, dtype: str) -> dict[str, np.ndarray]:
    return sequences(n) if kind == "sequence" else transitions(n, obs, dtype)


def nbytes(arrays: dict[str, np.ndarray]) -> int:
    """Bytes of all of `arrays` together."""
    return sum(a.nbytes for a in arrays.values())


class PixelStream:
    """Chunks of one actor's pixel stream: a new 84x84 frame per step, each sent once."""

    def __init__(self, stream: int):
        self.pool = (np.random.default_rng(stream).random((256, *ATARI_OBS[1:])) * 255).astype(np.uint8)
        self.next_key = stream << 40
        self.cur = -1  # key of the current obs' newest frame; -1: an episode starts next
        self.step = 0

    def chunk(self, n: int) -> dict[str, np.ndarray]:
        """The next `n` transitions as frames sent once plus frame keys for obs and next_obs."""
        keys, prevs, obs, nxt = [], [], [], []
        for _ in range(n):
            if self.cur < 0:
                self.cur = self._frame(keys, prevs, None)
            obs.append(self.cur)
            self.cur = self._frame(keys, prevs, self.cur)
            nxt.append(self.cur)
            self.step += 1
            if self.step % EPISODE_STEPS == 0:
                self.cur = -1
        k = np.asarray(keys, np.int64)
        return {
            "frame": self.pool[k % len(self.pool)],
            "frame_key": k,
            "frame_prev": np.asarray(prevs, np.int64),
            "obs": np.asarray(obs, np.int64),
            "next_obs": np.asarray(nxt, np.int64),
            "action": np.zeros(n, np.int64),
            "reward": np.ones(n, np.float32),
            "discount": np.full(n, 0.99, np.float32),
            "version": np.zeros(n, np.int64),
        }

    def _frame(self, keys: list[int], prevs: list[int], prev: int | None) -> int:
        key = self.next_key
        self.next_key += 1
        keys.append(key)
        prevs.append(key if prev is None else prev)
        return key


# ---- processes --------------------------------------------------------------------------
def _shard(cfg: dict, out: Any, stop: Any) -> None:
    import threading

    from canopy.config import ReplayConfig
    from canopy.replay import snapshot
    from canopy.replay.server import ReplayServer

    snap_dir = snapshot.shard_dir(cfg["snapshot_dir"], 0) if cfg.get("snapshot_dir") else None
    server = ReplayServer(ReplayConfig(**cfg), snapshot_dir=snap_dir)
    out.put(server.bind("tcp://127.0.0.1:0"))
    done = threading.Event()
    threading.Thread(target=lambda: (stop.wait(), done.set()), daemon=True).start()
    server.serve(done)


def inserter(endpoint: str, obs: tuple, dtype: str, chunk: int, seconds: float, out: Any) -> None:
    """Client process: insert `chunk`-item chunks for `seconds`; puts (transitions, seconds)."""
    from canopy.replay.client import InsertClient

    pixels = PixelStream(os.getpid()) if dtype == "pixels" else None
    arrays = _items(dtype, chunk, obs, dtype) if pixels is None else {}
    client = InsertClient(endpoint, inflight=8)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        client.insert(pixels.chunk(chunk) if pixels else arrays, timeout=30)
        n += chunk
    client.flush(timeout=30)
    out.put((n, time.perf_counter() - t0))
    client.close()


def sampler(endpoints: list[str], batch: int, update: bool, seconds: float, out: Any) -> None:
    """Client process: sample batches for `seconds` (with `update`, also update priorities).

    Puts (batches, seconds, wire bytes per batch, batches per request).
    """
    from canopy.replay.client import SampleClient

    client = SampleClient(endpoints, batch=batch, inflight=8)
    rng = np.random.default_rng(0)
    client.next(timeout=30)  # warm: every shard answered once
    n, t0, bytes0 = 0, time.perf_counter(), client.bytes_received_total
    while time.perf_counter() - t0 < seconds:
        b = client.next(timeout=30)
        if update:
            client.update_priorities(
                int(b["shard"][0]), b["slot"], b["gen"], rng.random(len(b["slot"])) + 0.01
            )
        n += 1
    # What the replies weighed on the wire per batch handed out, and how many batches one
    # request carried (replay/client.py sizes that from the first reply).
    wire_bytes = (client.bytes_received_total - bytes0) / n
    out.put((n, time.perf_counter() - t0, wire_bytes, client.group))
    client.close()


def _pull(msg_bytes: int, seconds: float, out: Any, ready: Any) -> None:
    import zmq

    sock = zmq.Context.instance().socket(zmq.PULL)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    ready.put(port)
    sock.recv()  # first message starts the clock
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds and sock.poll(1000):  # every wait is bounded
        sock.recv(copy=False)
        n += 1
    out.put((n * msg_bytes, time.perf_counter() - t0))
    sock.close(0)


def _push(port: int, msg_bytes: int, seconds: float) -> None:
    import zmq

    sock = zmq.Context.instance().socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 16)
    sock.connect(f"tcp://127.0.0.1:{port}")
    payload = np.zeros(msg_bytes, np.uint8)
    sock.setsockopt(zmq.SNDTIMEO, 1000)  # the receiver stops reading: give up within 1 s
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds + 30.0:
        try:
            sock.send(payload, copy=False)
        except zmq.Again:
            break
    sock.close(0)


# ---- orchestration ----------------------------------------------------------------------
class Cluster:
    """Shard processes for one measurement; always terminated on exit."""

    def __init__(self, n: int, cfg: dict):
        self.stop = CTX.Event()
        q = CTX.Queue()
        self.procs = [CTX.Process(target=_shard, args=(cfg, q, self.stop), daemon=True) for _ in range(n)]
        for p in self.procs:
            p.start()
        self.endpoints = [q.get(timeout=PROC_TIMEOUT_S) for _ in self.procs]

    def rss(self) -> list[int]:
        """RSS of every shard process in bytes (0 for one that cannot be read)."""
        return [harness.rss_bytes(p.pid) or 0 for p in self.procs]

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        harness.join(self.procs)


def run_clients(jobs: list[tuple]) -> list[tuple]:
    """Start client processes together; each returns (count, seconds, ...)."""
    q = CTX.Queue()
    procs = [CTX.Process(target=fn, args=(*args, q), daemon=True) for fn, *args in jobs]
    try:
        for p in procs:
            p.start()
        return [q.get(timeout=PROC_TIMEOUT_S) for _ in procs]
    finally:
        harness.join(procs, 10.0)


def rate(results: list[tuple]) -> float:
    """Per-second rates of client results (count, seconds, ...), summed."""
    return sum(r[0] / r[1] for r in results)


def zmq_bytes_per_s(msg_bytes: int, seconds: float) -> float:
    """Bytes/s raw ZeroMQ PUSH/PULL moves between two processes in `msg_bytes` messages."""
    out, ready = CTX.Queue(), CTX.Queue()
    pull = CTX.Process(target=_pull, args=(msg_bytes, seconds, out, ready), daemon=True)
    pull.start()
    push = None
    try:
        port = ready.get(timeout=PROC_TIMEOUT_S)
        push = CTX.Process(target=_push, args=(port, msg_bytes, seconds), daemon=True)
        push.start()
        total, secs = out.get(timeout=PROC_TIMEOUT_S)
        return total / secs
    finally:
        harness.join([pull, push])


def numpy_baseline(
    obs: tuple, dtype: str, chunk: int, capacity: int, batch: int, seconds: float
) -> dict[str, float]:
    """The same work in one process: a numpy ring buffer, uniform and naive prioritized
    (each for half of `seconds`)."""
    data = transitions(chunk, obs, dtype)
    cols = {k: np.zeros((capacity, *a.shape[1:]), a.dtype) for k, a in data.items()}
    cursor, n, t0 = 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds / 2:
        idx = (cursor + np.arange(chunk)) % capacity
        for k, a in data.items():
            cols[k][idx] = a
        cursor = (cursor + chunk) % capacity
        n += chunk
    insert = n / (time.perf_counter() - t0)
    rng = np.random.default_rng(0)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds / 2:
        idx = rng.integers(0, capacity, batch)
        _ = {k: c[idx] for k, c in cols.items()}
        n += 1
    uniform = n / (time.perf_counter() - t0)
    prio = rng.random(capacity)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds / 2:
        cum = np.cumsum(prio)  # the O(n) way: what a sum-tree avoids
        idx = np.searchsorted(cum, rng.random(batch) * cum[-1])
        _ = {k: c[idx] for k, c in cols.items()}
        prio[idx] = rng.random(batch) + 0.01
        n += 1
    prioritized = n / (time.perf_counter() - t0)
    return {"insert": insert, "uniform": uniform, "prioritized": prioritized}


def fill(endpoints: list[str], obs: tuple, dtype: str, items: int) -> None:
    """Insert about `items` transitions (dtype "sequence": r2d2 sequences) into every shard of
    `endpoints` (at least one chunk each)."""
    from canopy.replay.client import InsertClient

    chunk = 1024 if dtype == "float32" else 64
    for e in endpoints:
        pixels = PixelStream(next(_FILL_STREAMS)) if dtype == "pixels" else None
        arrays = _items(dtype, chunk, obs, dtype) if pixels is None else {}
        client = InsertClient(e, inflight=8)
        for _ in range(max(1, items // chunk)):
            client.insert(pixels.chunk(chunk) if pixels else arrays, timeout=60)
        client.flush(timeout=60)
        client.close()


def rss_per_transition(c: Cluster, dtype: str, items: int) -> dict[str, float]:
    """Shard RSS growth per stored Atari transition: over the whole fill, and over its
    second half alone (the marginal cost, free of the process's fixed overhead)."""
    rss0 = sum(c.rss())
    fill(c.endpoints, ATARI_OBS, dtype, items // 2)
    rss1 = sum(c.rss())
    fill(c.endpoints, ATARI_OBS, dtype, items - items // 2)
    rss2 = sum(c.rss())
    n = items * len(c.endpoints)
    return {
        "atari_rss_bytes_per_transition": (rss2 - rss0) / n,
        "atari_rss_bytes_per_transition_marginal": (rss2 - rss1) / (n - n // 2),
    }


def _probe(endpoint: str, seconds: float, out: Any) -> None:
    """Insert a small pixel chunk and sample a small batch in turn; report reply times."""
    from canopy.replay.client import InsertClient, SampleClient

    pixels = PixelStream(7)
    inserter = InsertClient(endpoint, inflight=1)
    sampler = SampleClient([endpoint], batch=8, inflight=1)
    stamps = []
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        inserter.insert(pixels.chunk(4), timeout=30)
        inserter.flush(timeout=30)
        sampler.next(timeout=30)
        stamps.append(time.time())
    out.put(stamps)
    inserter.close()
    sampler.close()


def snapshot_pause(cfg: dict, items: int, seconds: float) -> dict[str, float]:
    """Longest reply gap a client sees while the shard snapshots `items` Atari transitions."""
    from canopy.replay import snapshot

    with (
        harness.scratch_dir("canopy-bench-snap-") as root,
        Cluster(1, {**cfg, "snapshot_dir": str(root)}) as c,
    ):
        fill(c.endpoints, ATARI_OBS, "pixels", items)
        q = CTX.Queue()
        probe = CTX.Process(target=_probe, args=(c.endpoints[0], 3 * seconds, q), daemon=True)
        probe.start()
        try:
            time.sleep(seconds)  # the probe's quiet gaps first
            t0 = time.time()
            reply = snapshot.request(c.endpoints[0], timeout=PROC_TIMEOUT_S)
            t1 = time.time()
            stamps = np.asarray(q.get(timeout=PROC_TIMEOUT_S))
        finally:
            harness.join([probe], 10.0)
    gaps = np.diff(stamps)
    during = (stamps[1:] >= t0) & (stamps[:-1] <= t1)
    quiet = stamps[1:] < t0
    return {
        "items": items,
        "max_gap_during_snapshot_ms": float(gaps[during].max(initial=0.0)) * 1000,
        "max_gap_without_snapshot_ms": float(gaps[quiet].max(initial=0.0)) * 1000,
        "median_gap_ms": float(np.median(gaps)) * 1000,
        "fork_ms": float(reply["pause_ms"]),
        "longest_request_during_snapshot_ms": float(reply["request_max_ms"]),
        "snapshot_write_s": float(reply["seconds"]),
    }
