"""`canopy bench soak --actors 1000 --minutes 10 --json FILE`: a long run under load.

A real `canopy up` (CartPole, its learner training and publishing every PUBLISH_EVERY
updates, a checkpoint every CHECKPOINT_S, its own two actors) plus simulated actors in
worker processes: each has its own replay InsertClient and cache ModelClient
(own sockets), inserts a CartPole-sized chunk per period and picks up every new version.
Workers share one membership view per process (as actors on one host could). The run
reports, every sample period: inserts and versions received per second, how often the
replay shards held inserts back (backpressure: the rate limiter keeps samples per insert
bounded, so actors slow down when the learner is slower: by design, nothing queues
without bound), the RSS of every role process, and of every Redis shard `used_memory`
(INFO memory), its key count and the root's ledger entries (canopy/keys.py: every key
family has a bound).

Warm-up ends at the first sample after both WARMUP_FRACTION of the run and the ledger
holding its full `learner.keep_ledger` entries (or at WARMUP_FRACTION if it never fills:
the report says so in `ledger_full_at_s`): from there on, memory should be flat.

Checks: no errors, the learner keeps training, RSS growth of every role under 10% after
warm-up, every Redis shard's `used_memory` level at the end of the run within 10% of its
level right after warm-up, and the ledger never above `learner.keep_ledger` entries. A
shard's level is the median of LEVEL_SAMPLES samples (the first after warm-up, the last of
the run): a checkpoint in flight holds a whole extra checkpoint for a moment (a third of a
small shard's memory), which is no growth; the highest sample is reported beside it
(`redis_peak_over_level`).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import signal
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np

from canopy import config as config_mod
from canopy.cluster.bench import harness, report
from canopy.config import Config
from canopy.errors import DeadlineExceeded

CHUNK = 64
SAMPLE_S = 5.0
PUBLISH_EVERY = 5  # updates between versions: many publishes, so an unbounded ledger shows
CHECKPOINT_S = 15.0
FLAT = 0.10  # the largest drift from the end of warm-up a bounded figure may show
LEVEL_SAMPLES = 12  # a minute of samples: the median over them is a shard's memory level
WARMUP_FRACTION = 0.25
START_TIMEOUT_S = 120.0


def chunk(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One CartPole-sized insert chunk of CHUNK random transitions."""
    return {
        "obs": rng.normal(size=(CHUNK, 4)).astype(np.float32),
        "action": rng.integers(2, size=CHUNK),
        "reward": np.ones(CHUNK, np.float32),
        "next_obs": rng.normal(size=(CHUNK, 4)).astype(np.float32),
        "discount": np.full(CHUNK, 0.97, np.float32),
        "version": np.zeros(CHUNK, np.int64),
    }


def worker(config_path: str, first: int, count: int, period_s: float, out: Any, stop: Any) -> None:
    """`count` simulated actors in one process; puts (inserts, held_back, versions, errors)."""
    from canopy.cache.client import leaf_client
    from canopy.keys import Keys
    from canopy.redisconn import connect
    from canopy.replay.client import InsertClient
    from canopy.replay.membership import RedisMembers

    cfg = config_mod.load(config_path)
    r = connect(cfg.cluster, "soak", first)
    members = RedisMembers(r, Keys(cfg.run.name), 1.0, fallback=cfg.cluster.replay)
    ids = range(first, first + count)
    inserters = [InsertClient(members, 2, key=i) for i in ids]
    models = [leaf_client(cfg.cluster, cfg.cache, "actor", i) for i in ids]
    rng = np.random.default_rng(first)
    data = chunk(rng)
    totals = np.zeros(4, np.int64)
    next_report = time.monotonic() + 1.0
    try:
        while not stop.is_set():
            start = time.monotonic()
            for ins, mc in zip(inserters, models, strict=True):
                try:
                    ins.insert(data, timeout=0.001)
                    totals[0] += 1
                except DeadlineExceeded:
                    totals[1] += 1  # the shard is behind: this actor would wait
                except Exception:  # any other failure is what the soak looks for
                    totals[3] += 1
                if mc.poll() is not None:
                    totals[2] += 1
            if time.monotonic() >= next_report:
                out.put(totals.copy())
                totals[:] = 0
                next_report += 1.0
            stop.wait(max(0.0, period_s - (time.monotonic() - start)))
    finally:
        out.put(totals.copy())
        for mc in models:
            mc.stop()
        for ins in inserters:
            ins.close()
        members.close()


def role_pids(cluster: dict) -> dict[str, int]:
    """Every role process of a run by name (`redis-0`, `learner-0`, ...), from its cluster.json."""
    pids = {f"redis-{i}": e["pid"] for i, e in enumerate(cluster["redis"])}
    for role, entries in cluster["roles"].items():
        pids.update({f"{role}-{e['id']}": e["pid"] for e in entries})
    return pids


class RedisWatch:
    """What the soak reads from Redis: every shard's memory and key count, the root's ledger,
    the learners' counts."""

    def __init__(self, cfg: Config):
        from canopy.keys import Keys
        from canopy.redisconn import connect

        self.keys = Keys(cfg.run.name)
        self.shards = [connect(cfg.cluster, "soak", 0, shard=i) for i in range(cfg.redis.shards)]

    def sample(self) -> dict[str, Any]:
        """One row's Redis figures."""
        root = self.shards[0]
        learners = [root.hgetall(self.keys.proc("learner", i)) for i in range(2)]  # active and standby
        return {
            "learner_updates": max(int(float(h.get(b"updates_total", 0))) for h in learners),
            "versions_published": sum(int(float(h.get(b"versions_published_total", 0))) for h in learners),
            "ledger_entries": self._ledger_entries(root),
            "redis_used_memory": {
                f"redis-{i}": int(r.info("memory")["used_memory"]) for i, r in enumerate(self.shards)
            },
            "redis_keys": {f"redis-{i}": int(r.dbsize()) for i, r in enumerate(self.shards)},
        }

    def _ledger_entries(self, root: Any) -> int:
        """Entries in the ledger: the index's size, plus any entry the index lost (a leak).

        A SCAN that overlaps a trim can return an entry deleted during it beside the one that
        replaced it, so it is not the count itself. The publisher writes an entry with its index
        member and deletes both in one transaction: a scanned entry that is missing from an index
        read after the scan and still exists is one the index does not bound.
        """
        scanned = set(root.scan_iter(match=self.keys.ledger_version("*"), count=1000))
        indexed = {
            self.keys.ledger_version(m.decode()).encode() for m in root.zrange(self.keys.ledger_index, 0, -1)
        }
        leaked = [k for k in scanned - indexed if root.exists(k)]
        return len(indexed) + len(leaked)

    def close(self) -> None:
        """Close the clients of every shard."""
        for r in self.shards:
            r.close()


def warmup_index(series: list[dict], keep_ledger: int) -> tuple[int, float | None]:
    """The sample that ends warm-up, and when the ledger first held `keep_ledger` entries."""
    full = next((i for i, row in enumerate(series) if row["ledger_entries"] >= keep_ledger), None)
    first = max(0, int(len(series) * WARMUP_FRACTION) - 1)
    end = first if full is None else min(max(first, full), len(series) - 1)
    return end, None if full is None else series[full]["t_s"]


def levels(values: list[int]) -> tuple[float, float]:
    """The level (median) of the first and of the last LEVEL_SAMPLES of `values` (fewer when the
    run is short: half of them each)."""
    n = max(1, min(LEVEL_SAMPLES, len(values) // 2))
    return statistics.median(values[:n]), statistics.median(values[-n:])


def main(args: argparse.Namespace) -> int:
    """Soak a `canopy up` under the simulated actors; the report goes to `--json`, 1 if a check is missed."""
    duration = args.minutes * 60
    # Scratch once measured; kept when the run fails, for its logs.
    with harness.scratch_dir("canopy-soak-", keep_on_error=True) as run_dir:
        series, totals, keep_ledger = soak(args, run_dir, duration)
    end, ledger_full_at = warmup_index(series, keep_ledger)
    warm, last, after = series[end], series[-1], series[end:]
    memory, peaks = {}, {}
    for name in warm["redis_used_memory"]:
        values = [row["redis_used_memory"][name] for row in after]
        first, end = levels(values)
        memory[name] = (round(abs(end - first) / first, 4), first)
        peaks[name] = round(max(values) / first - 1, 4)
    most_ledger = max(row["ledger_entries"] for row in series)
    growth = {
        name: round((last["rss_bytes"][name] - rss) / rss, 4)
        for name, rss in warm["rss_bytes"].items()
        if rss and last["rss_bytes"].get(name)
    }
    checks = [
        report.check("errors", int(totals[3]), "count", "0", None, totals[3] == 0),
        report.check(
            "learner keeps training",
            last["learner_updates"] - warm["learner_updates"],
            "updates after warm-up",
            "> 0",
            warm["learner_updates"],
            last["learner_updates"] > warm["learner_updates"],
        ),
        report.check(
            "ledger entries bounded",
            most_ledger,
            "entries",
            f"<= learner.keep_ledger ({keep_ledger})",
            last["versions_published"],
            most_ledger <= keep_ledger,
        ),
    ]
    checks += [
        report.check(
            f"RSS growth after warm-up: {name}", g, "fraction", f"< {FLAT}", warm["rss_bytes"][name], g < FLAT
        )
        for name, g in growth.items()
    ]
    checks += [
        report.check(
            f"Redis used_memory flat after warm-up: {name}",
            d,
            "level at the end vs after warm-up, fraction",
            f"<= {FLAT}",
            first,
            d <= FLAT,
        )
        for name, (d, first) in memory.items()
    ]
    figures = {
        "actors": args.actors,
        "minutes": args.minutes,
        "processes": args.processes,
        "period_s": args.period,
        "publish_every": PUBLISH_EVERY,
        "checkpoint_every_s": CHECKPOINT_S,
        "keep_ledger": keep_ledger,
        "warmup_end_s": warm["t_s"],
        "ledger_full_at_s": ledger_full_at,
        "redis_peak_over_level": peaks,
        "versions_published": last["versions_published"],
        "inserts_total": int(totals[0]) * CHUNK,
        "held_back_total": int(totals[1]),
        "versions_received_total": int(totals[2]),
        "series": series,
    }
    report.write(args.json, "soak", figures, checks)
    return 0 if all(c["met"] for c in checks) else 1


def soak(args: argparse.Namespace, run_dir: Path, duration: float) -> tuple[list[dict], np.ndarray, int]:
    """A `canopy up` in `run_dir` under the simulated actors for `duration` s: (the samples,
    totals, the run's `learner.keep_ledger`)."""
    sets = [f"learner.publish_every={PUBLISH_EVERY}", f"checkpoint.every_s={CHECKPOINT_S}", *args.set]
    cmd = harness.up_command(
        "CartPole-v1", run_dir, stop_at_return="1e9", time_limit=duration + START_TIMEOUT_S + 60, sets=sets
    )
    with open(run_dir / "up.stderr", "wb") as stderr:
        up = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
    ctx = mp.get_context("spawn")
    stop, out = ctx.Event(), ctx.Queue()
    procs: list = []
    try:
        cluster = harness.wait_started(up, run_dir, START_TIMEOUT_S, lambda: f"see {run_dir}/up.stderr")
        per = -(-args.actors // args.processes)
        for p in range(args.processes):
            first, count = 1000 + p * per, min(per, args.actors - p * per)
            if count > 0:
                procs.append(
                    ctx.Process(target=worker, args=(cluster["config"], first, count, args.period, out, stop))
                )
                procs[-1].start()
        cfg = config_mod.load(cluster["config"])
        series, totals = sample(args, duration, cfg, role_pids(cluster), out)
        return series, totals, cfg.learner.keep_ledger
    finally:
        stop.set()
        harness.join(procs, 30.0)
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGTERM)  # the launcher's session: it stops its roles itself
            up.wait(timeout=60)


def sample(
    args: argparse.Namespace, duration: float, cfg: Config, pids: dict[str, int], out: Any
) -> tuple[list[dict], np.ndarray]:
    """Every SAMPLE_S until `duration`: the workers' counts, each role's RSS, the Redis figures."""
    series: list[dict] = []
    totals = np.zeros(4, np.int64)
    start = time.monotonic()
    with contextlib.closing(RedisWatch(cfg)) as watch, harness.progress(transient=False) as progress:
        task = progress.add_task(f"soak: {args.actors} simulated actors", total=duration)
        while (elapsed := time.monotonic() - start) < duration:
            time.sleep(SAMPLE_S)
            window = np.zeros(4, np.int64)
            while not out.empty():
                window += out.get()
            totals += window
            series.append(
                {
                    "t_s": round(time.monotonic() - start, 1),
                    "inserts_per_s": round(window[0] * CHUNK / SAMPLE_S),
                    "held_back_per_s": round(window[1] / SAMPLE_S, 1),
                    "versions_received_per_s": round(window[2] / SAMPLE_S, 1),
                    "errors": int(window[3]),
                    "rss_bytes": {name: harness.rss_bytes(pid) for name, pid in pids.items()},
                    **watch.sample(),
                }
            )
            progress.update(task, completed=min(elapsed, duration))
    return series, totals
