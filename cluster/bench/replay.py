"""`canopy bench replay`: replay shard throughput across processes, beside in-run baselines.

Each shard and each client runs in its own process (multiprocessing spawn) and talks over
ZeroMQ on loopback, exactly as actors and learners do. Baselines measured in the same run:
an in-process numpy ring buffer doing the same work (no sockets, no processes), and raw
ZeroMQ PUSH/PULL between two processes moving the same bytes per message. Every figure is
printed beside its baselines as ratios; the JSON holds one `checks` entry per goal of the
replay issue.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time
from typing import Any

import numpy as np

from cluster.bench import report

CARTPOLE_OBS = (4,)
ATARI_OBS = (4, 84, 84)
SECONDS = 2.0
PROC_TIMEOUT_S = 60.0
CTX = mp.get_context("spawn")


def transitions(n: int, obs_shape: tuple[int, ...], dtype: str) -> dict[str, np.ndarray]:
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


def _nbytes(arrays: dict[str, np.ndarray]) -> int:
    return sum(a.nbytes for a in arrays.values())


# -- processes ----------------------------------------------------------------------------


def _shard(cfg: dict, out: Any, stop: Any) -> None:
    import threading

    from cluster.config import ReplayConfig
    from replay.server import ReplayServer

    server = ReplayServer(ReplayConfig(**cfg))
    out.put(server.bind("tcp://127.0.0.1:0"))
    done = threading.Event()
    threading.Thread(target=lambda: (stop.wait(), done.set()), daemon=True).start()
    server.serve(done)


def _inserter(endpoint: str, obs: tuple, dtype: str, chunk: int, seconds: float, out: Any) -> None:
    from replay.client import InsertClient

    arrays = transitions(chunk, obs, dtype)
    client = InsertClient(endpoint, inflight=8)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        client.insert(arrays, timeout=30)
        n += chunk
    client.flush(timeout=30)
    out.put((n, time.perf_counter() - t0))
    client.close()


def _sampler(endpoints: list[str], batch: int, update: bool, seconds: float, out: Any) -> None:
    from replay.client import SampleClient

    client = SampleClient(endpoints, batch=batch, inflight=8)
    rng = np.random.default_rng(0)
    client.next(timeout=30)  # warm: every shard answered once
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        b = client.next(timeout=30)
        if update:
            client.update_priorities(
                int(b["shard"][0]), b["slot"], b["gen"], rng.random(len(b["slot"])) + 0.01
            )
        n += 1
    out.put((n, time.perf_counter() - t0))
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


# -- orchestration --------------------------------------------------------------------------


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
        return [_rss(p.pid) for p in self.procs]

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)


def _rss(pid: int | None) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _run(jobs: list[tuple]) -> list[tuple[int, float]]:
    """Start client processes together; each returns (count, seconds)."""
    q = CTX.Queue()
    procs = [CTX.Process(target=fn, args=(*args, q), daemon=True) for fn, *args in jobs]
    try:
        for p in procs:
            p.start()
        return [q.get(timeout=PROC_TIMEOUT_S) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()


def _rate(results: list[tuple[int, float]]) -> float:
    return sum(n / s for n, s in results)


def zmq_bytes_per_s(msg_bytes: int, seconds: float = SECONDS) -> float:
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
        for p in (pull, push):
            if p is not None:
                p.join(timeout=5)
                if p.is_alive():
                    p.kill()


def numpy_baseline(obs: tuple, dtype: str, chunk: int, capacity: int, batch: int) -> dict[str, float]:
    """The same work in one process: a numpy ring buffer, uniform and naive prioritized."""
    data = transitions(chunk, obs, dtype)
    cols = {k: np.zeros((capacity, *a.shape[1:]), a.dtype) for k, a in data.items()}
    cursor, n, t0 = 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < SECONDS / 2:
        idx = (cursor + np.arange(chunk)) % capacity
        for k, a in data.items():
            cols[k][idx] = a
        cursor = (cursor + chunk) % capacity
        n += chunk
    insert = n / (time.perf_counter() - t0)
    rng = np.random.default_rng(0)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < SECONDS / 2:
        idx = rng.integers(0, capacity, batch)
        _ = {k: c[idx] for k, c in cols.items()}
        n += 1
    uniform = n / (time.perf_counter() - t0)
    prio = rng.random(capacity)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < SECONDS / 2:
        cum = np.cumsum(prio)  # the O(n) way: what a sum-tree avoids
        idx = np.searchsorted(cum, rng.random(batch) * cum[-1])
        _ = {k: c[idx] for k, c in cols.items()}
        prio[idx] = rng.random(batch) + 0.01
        n += 1
    prioritized = n / (time.perf_counter() - t0)
    return {"insert": insert, "uniform": uniform, "prioritized": prioritized}


def _fill(endpoints: list[str], obs: tuple, dtype: str, items: int) -> None:
    from replay.client import InsertClient

    chunk = 1024 if dtype == "float32" else 64
    arrays = transitions(chunk, obs, dtype)
    for e in endpoints:
        client = InsertClient(e, inflight=8)
        for _ in range(max(1, items // chunk)):
            client.insert(arrays, timeout=60)
        client.flush(timeout=60)
        client.close()


def main(args: argparse.Namespace) -> int:
    batch = 256
    cp_cap, at_cap = 200_000, args.atari_items
    cp_cfg = dict(capacity=cp_cap, min_size=1, samples_per_insert=0.0, max_frame_mb=256)
    figs: dict[str, Any] = {"seconds_per_figure": SECONDS, "cpu_count": os.cpu_count()}
    cp_item = _nbytes(transitions(1, CARTPOLE_OBS, "float32"))
    at_item = _nbytes(transitions(1, ATARI_OBS, "uint8"))

    # Baselines first (same run, same machine state).
    figs["baseline_numpy_cartpole"] = numpy_baseline(CARTPOLE_OBS, "float32", 1024, cp_cap, batch)
    figs["baseline_numpy_atari"] = numpy_baseline(ATARI_OBS, "uint8", 64, at_cap, batch)
    zmq_small = zmq_bytes_per_s(1024 * cp_item)
    zmq_batch = zmq_bytes_per_s(batch * cp_item)
    zmq_atari_chunk = zmq_bytes_per_s(64 * at_item)
    zmq_atari_batch = zmq_bytes_per_s(batch * at_item)
    zmq_1mib = zmq_bytes_per_s(2**20)
    figs["baseline_zmq_bytes_per_s"] = {
        "cartpole_chunk_1024": zmq_small,
        "cartpole_batch_256": zmq_batch,
        "atari_chunk_64": zmq_atari_chunk,
        "atari_batch_256": zmq_atari_batch,
        "1MiB": zmq_1mib,
    }

    for shards in (1, 2):
        key = f"{shards}_shard"
        r: dict[str, Any] = {}
        with Cluster(shards, cp_cfg) as c:
            for chunk in (64, 1024):
                jobs = [(_inserter, e, CARTPOLE_OBS, "float32", chunk, SECONDS) for e in c.endpoints]
                r[f"cartpole_insert_chunk{chunk}_per_s"] = _rate(_run(jobs))
        with Cluster(shards, cp_cfg) as c:
            _fill(c.endpoints, CARTPOLE_OBS, "float32", 100_000)
            r["cartpole_uniform_batches_per_s"] = _rate(
                _run([(_sampler, c.endpoints, batch, False, SECONDS)])
            )
        with Cluster(shards, {**cp_cfg, "sampler": "prioritized"}) as c:
            _fill(c.endpoints, CARTPOLE_OBS, "float32", 100_000)
            r["cartpole_prioritized_update_batches_per_s"] = _rate(
                _run([(_sampler, c.endpoints, batch, True, SECONDS)])
            )
        at_cfg = {**cp_cfg, "capacity": at_cap}
        with Cluster(shards, at_cfg) as c:
            rss0 = sum(c.rss())
            jobs = [(_inserter, e, ATARI_OBS, "uint8", 64, SECONDS) for e in c.endpoints]
            r["atari_insert_per_s"] = _rate(_run(jobs))
            _fill(c.endpoints, ATARI_OBS, "uint8", at_cap)
            r["atari_rss_bytes_per_transition"] = (sum(c.rss()) - rss0) / (at_cap * shards)
            r["atari_sample_batches_per_s"] = _rate(_run([(_sampler, c.endpoints, batch, False, SECONDS)]))
        figs[key] = r

    one, two = figs["1_shard"], figs["2_shard"]
    npc, npa = figs["baseline_numpy_cartpole"], figs["baseline_numpy_atari"]
    ins = max(one["cartpole_insert_chunk64_per_s"], one["cartpole_insert_chunk1024_per_s"])
    atari_batch_bytes = batch * at_item
    zmq_atari_batches = zmq_atari_batch / atari_batch_bytes
    checks = [
        report.check(
            "cartpole_insert_per_shard",
            ins,
            "transitions/s",
            ">= 1e6 (Reverb ~1e4)",
            {"numpy_in_process": npc["insert"], "zmq_same_bytes": zmq_small / cp_item},
            ins >= 1e6,
        ),
        report.check(
            "uniform_sample_batch256",
            one["cartpole_uniform_batches_per_s"],
            "batches/s",
            ">= 1e4 (Reverb ~225, cpprb ~2e4 in-process)",
            {"numpy_in_process": npc["uniform"], "zmq_same_bytes": zmq_batch / (batch * cp_item)},
            one["cartpole_uniform_batches_per_s"] >= 1e4,
        ),
        report.check(
            "prioritized_sample_update_batch256",
            one["cartpole_prioritized_update_batches_per_s"],
            "batches/s",
            ">= 3.4e3 (cpprb ~3.4e3 in-process)",
            {"numpy_cumsum_in_process": npc["prioritized"], "zmq_same_bytes": zmq_batch / (batch * cp_item)},
            one["cartpole_prioritized_update_batches_per_s"] >= 3.4e3,
        ),
        report.check(
            "atari_sample_vs_zmq_limit",
            one["atari_sample_batches_per_s"] / zmq_atari_batches,
            "ratio",
            ">= 0.8 of ZeroMQ for the same bytes",
            {"zmq_batches_per_s": zmq_atari_batches, "numpy_in_process": npa["uniform"]},
            one["atari_sample_batches_per_s"] >= 0.8 * zmq_atari_batches,
        ),
        report.check(
            "atari_insert",
            one["atari_insert_per_s"],
            "transitions/s",
            "reported (no numeric goal)",
            {"numpy_in_process": npa["insert"], "zmq_same_bytes": zmq_atari_chunk / at_item},
            True,
        ),
        report.check(
            "atari_rss_per_transition",
            one["atari_rss_bytes_per_transition"],
            "bytes",
            f"<= {1.2 * 7056:.0f} (1.2 x one 84x84 frame)",
            {"numpy_obs_and_next_obs": at_item},
            one["atari_rss_bytes_per_transition"] <= 1.2 * 7056,
        ),
        report.check(
            "two_shards_cartpole_insert_scaling",
            max(two["cartpole_insert_chunk64_per_s"], two["cartpole_insert_chunk1024_per_s"]) / ins,
            "x",
            f">= 1.8 where cores allow ({os.cpu_count()} cores here: each shard and client is a process)",
            {"one_shard": ins},
            max(two["cartpole_insert_chunk64_per_s"], two["cartpole_insert_chunk1024_per_s"]) >= 1.8 * ins,
        ),
        report.check(
            "two_shards_uniform_sample_scaling",
            two["cartpole_uniform_batches_per_s"] / one["cartpole_uniform_batches_per_s"],
            "x",
            ">= 1.8 where cores allow",
            {"one_shard": one["cartpole_uniform_batches_per_s"]},
            two["cartpole_uniform_batches_per_s"] >= 1.8 * one["cartpole_uniform_batches_per_s"],
        ),
    ]
    _print_table(figs, checks)
    report.write(args.json, "replay", figs, checks)
    return 0


def _print_table(figs: dict, checks: list[dict]) -> None:
    for c in checks:
        base = ", ".join(
            f"{k} {v:,.1f} ({c['value'] / v:.2f}x)" if isinstance(v, float | int) and v else f"{k} {v}"
            for k, v in c["baseline"].items()
        )
        mark = "ok  " if c["met"] else "MISS"
        print(f"{mark} {c['name']}: {c['value']:,.2f} {c['unit']} (goal {c['goal']}); baselines: {base}")
