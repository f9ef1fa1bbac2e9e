"""`canopy bench broadcast`: time from publish to "actor can act with it", tree vs baselines.

Measures the model data flow end to end with real processes: a redis-server root, a tier
of cache nodes, one leaf node per simulated host (shared-memory ring), and simulated
actors, many per worker process, each with its own sockets and its own policy object
(`MLPPolicy` on read-only views of its host's shared copy, or on a private copy). Arms,
all in the same run:

- tree: Redis -> `--tier1` nodes -> one leaf per host -> actors (shm, notifications only);
- tree_direct: Redis -> one leaf per host -> actors: tree minus tree_direct is what a tier
  costs, which cut-through keeps small;
- flat: actors GET each version from Redis themselves. Redis serves one request at a time,
  so this is bandwidth-bound whatever the concurrency: above `FLAT_BUDGET_BYTES` per
  version only a sample of actors downloads and the latencies are scaled by N / sample
  (said in the JSON), which is what the missing actors would queue behind;
- pub: one ZeroMQ PUB socket sending the whole version to every actor's SUB socket. Every
  subscriber's copy is in flight at once (TCP shares the bandwidth fairly), so it needs
  about N x model bytes of memory; above `PUB_MEMORY_SHARE` of the available memory it
  runs with the most actors that fit and says so;
- lower_bound: one memory copy of the model per host plus the latency of a tiny PUB
  notification to every actor.

With --netns (root only) each simulated host is a network namespace of cluster/netns.py
("root" holds Redis, tier 1, the publisher and the PUB socket; "h<i>" a leaf and its
actors), links optionally rate-limited (--rate-mbit), so the cross-host tree is measured
over real veth links and the shared-memory path is taken only within a host.

Per version it records when the slowest node of each tier held the whole version
(`tier1_landed_s`, `leaf_landed_s`: with cut-through the leaf lands right after tier 1),
bytes sent by the Redis root and each tier, and CPU seconds by role, and where the time
went, all from the publish: `publish_s` (the learner's write to Redis), then per tier the
slowest node's `<tier>_heard_s` (notified), `_begun_s` (manifest in), `_fetched_s` (last
chunk in), `_stored_s` (checked, in the host ring), `_announced_s` (landed notification
sent; cache/node.py `stages`), then `actors_woke_s` (the first actor process heard it),
`actors_first_s`, `p50_s` and `max_s` (actors ready to act). Each arm first publishes
`WARMUP_VERSIONS` versions that are reported apart (`warmup_versions`), not in the figures.

In the tree arms each worker process holds one `cache.client.HostWatch`: one SUB to its
leaf's landed notifications for all its actors, while each actor keeps its own SUB (beats:
liveness and catch-up) and DEALER, its own pin cells and its own policy object on views of
the host's copy; a worker stands for the actor processes of a host, and an actor process
of canopy holds one ModelClient, so there the watch and the actor's SUB are the same
thing. The lower bound's notification (one PUB to every actor's SUB) is per actor.

`CANOPY_BENCH_PROFILE=DIR` writes a cProfile dump of each actor worker to DIR.

Each actor releases a private copy right after acting once with it: N private copies of a
large model would not fit in this machine's memory, which is the point of the tree.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import redis
import zmq
from rich.console import Console
from rich.progress import Progress

from cache import blob, codecs, topology
from cluster import lifecycle, netns
from cluster.bench.report import check, write
from cluster.errors import UserError
from cluster.keys import Keys
from cluster.version import Version

VERSION_TIMEOUT_S = 300.0
START_TIMEOUT_S = 120.0
FLAT_BUDGET_BYTES = 2 << 30  # bytes Redis serves per version in the flat arm before sampling
PUB_MEMORY_SHARE = 0.4  # of MemAvailable the pub arm's receivers may fill (the machine is shared)
MAX_SOCKETS = 16_384  # per worker: two per simulated actor
CLONE_NEWNET = 0x40000000
EVENTS, POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)  # plain ints: enum arithmetic is slow here
PROBE = b"probe"  # the PUB arms' join signal, sent until every subscriber heard one
# Versions each arm publishes before the measured ones, reported apart (`warmup_versions`):
# the first version pays one-time costs (the host ring is created and its pages first
# touched, lazy imports, first views of each slot) that the steady state never sees again.
WARMUP_VERSIONS = 1
STAGES = ("heard", "begun", "fetched", "stored", "announced")  # a node's way, cache/node.py


def model(mb: float, seed: int) -> dict[str, np.ndarray]:
    """An actable 2-layer MLP (4 inputs, 2 actions) of about `mb` MiB of float32."""
    hidden = max(8, int(mb * 2**20 / 4 / 7))
    rng = np.random.default_rng(seed)
    return {
        "layers.0.weight": rng.standard_normal((hidden, 4), dtype=np.float32),
        "layers.0.bias": rng.standard_normal(hidden, dtype=np.float32),
        "layers.1.weight": rng.standard_normal((2, hidden), dtype=np.float32) * 0.01,
        "layers.1.bias": np.zeros(2, np.float32),
    }


def cpu_s(pids: list[int]) -> float:
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (FileNotFoundError, ProcessLookupError, IndexError):
            pass
    return total


class Cluster:
    """A private redis-server plus every process the bench starts; `close` stops them all."""

    def __init__(self, work: Path, net: netns.Network | None = None):
        self.work, self.procs, self.net = work, [], net
        self.addr = self.address("root")
        self.password = secrets.token_urlsafe(16)
        (work / "pw").write_text(self.password)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        conf = work / "redis.conf"
        conf.write_text(
            f'port {self.port}\nbind {self.addr}\nsave ""\nappendonly no\ndir {work}\n'
            f"user default off\nuser canopy on >{self.password} ~* &* +@all\n"
            "client-output-buffer-limit pubsub 0 0 0\nclient-output-buffer-limit normal 0 0 0\n"
            "proto-max-bulk-len 1gb\nmaxclients 20000\n"
        )
        self.redis_proc = self.spawn([shutil.which("redis-server") or "redis-server", str(conf)], out=False)
        self.r = redis.Redis(self.addr, self.port, username="canopy", password=self.password)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.r.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def address(self, host: str) -> str:
        """Where processes of `host` ("root" or "h<i>") listen: its namespace's address."""
        return self.net[host].address if self.net is not None else "127.0.0.1"

    def spawn(self, cmd: list[str], out: bool = True, host: str = "root") -> subprocess.Popen:
        """Start `cmd` on `host` (its network namespace with --netns, else right here)."""
        kwargs = {
            "stdout": subprocess.PIPE if out else subprocess.DEVNULL,
            "stdin": subprocess.PIPE,
            "text": True,
            "cwd": Path(__file__).resolve().parents[2],
            "preexec_fn": _die_with_parent,  # nothing outlives a bench that is killed
        }
        p = self.net[host].popen(cmd, **kwargs) if self.net is not None else subprocess.Popen(cmd, **kwargs)
        self.procs.append(p)
        return p

    def node(
        self, run: str, parents: list, name: str, shm: str = "", host: str = "root"
    ) -> tuple[subprocess.Popen, list, Path]:
        counters = self.work / f"{name}.json"
        p = self.spawn(
            [
                sys.executable,
                "-m",
                "cache.standalone",
                "--run",
                run,
                "--redis",
                f"{self.addr}:{self.port}",
                "--bind",
                f"tcp://{self.address(host)}:0",
                "--password-file",
                str(self.work / "pw"),
                "--parents",
                json.dumps(parents),
                "--name",
                name,
                "--counters",
                str(counters),
                "--set=poll_s=0.5",
                "--set=keep_versions=4",
                "--set=parent_timeout_s=5.0",  # a loaded 2-core box must not trigger failovers
                "--set=heartbeat_s=1.0",  # a beat costs every one of a host's actors a wake-up
                *(["--shm-tag", shm] if shm else []),
            ],
            host=host,
        )
        eps = json.loads(readline(p, START_TIMEOUT_S))
        return p, [eps["fetch"], eps["notify"]], counters

    def stop(self, procs: list[subprocess.Popen]) -> None:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)

    def close(self) -> None:
        self.stop(list(reversed(self.procs)))


def _die_with_parent() -> None:
    ctypes.CDLL(None).prctl(lifecycle.PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def available_memory() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def readline(p: subprocess.Popen, timeout: float) -> str:
    poll = select.poll()  # not select(): the bench holds thousands of descriptors
    poll.register(p.stdout, select.POLLIN)
    if not poll.poll(timeout * 1000):
        raise TimeoutError(f"process {p.args[:4]} said nothing within {timeout:g}s")
    line = p.stdout.readline()
    if not line:
        raise RuntimeError(f"process {p.args[:4]} exited with {p.wait()} (see its stderr above)")
    return line


def wait_ready(workers: list[subprocess.Popen], pub: zmq.Socket | None) -> None:
    """Until every worker says all its actors are attached. PUB/SUB has no handshake, so
    for the PUB arms probes go out meanwhile: a worker is ready once each SUB heard one."""
    waiting = {p.stdout.fileno(): p for p in workers}
    poll = select.poll()
    for fd in waiting:
        poll.register(fd, select.POLLIN)
    deadline = time.monotonic() + START_TIMEOUT_S
    while waiting:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(waiting)} workers did not attach their actors in {START_TIMEOUT_S:g}s")
        if pub is not None:
            pub.send_multipart([PROBE, b""])
        for fd, _ in poll.poll(50):
            json.loads(readline(waiting.pop(fd), START_TIMEOUT_S))
            poll.unregister(fd)


def split(n: int, parts: int) -> list[int]:
    return [n // parts + (i < n % parts) for i in range(parts)]


def run_arm(cl: Cluster, arm: str, args: argparse.Namespace, actors: int, setup: dict, progress) -> dict:
    """Start workers for `actors` actors, publish `versions` versions, collect ready times.

    setup: run (key namespace), endpoints (one per host), pids (node processes), and for
    the PUB arms `pub` (the socket) and `mb` (the model size sent).
    """
    mode = {"tree": "tree", "tree_direct": "tree", "flat": "flat"}.get(arm, "pub")
    mb = setup.get("mb", args.model_mb)
    hosts = len(setup["endpoints"])
    workers = []
    # Each worker serves actors of one host; workers are spread evenly over hosts.
    for w, n in enumerate(split(actors, max(args.workers, 1))):
        if n:
            cfg = {"mode": mode, "actors": n, "endpoints": setup["endpoints"][w % hosts]}
            cfg |= {"run": setup["run"], "redis": [cl.addr, cl.port], "pw": str(cl.work / "pw")}
            cmd = [sys.executable, "-m", "cluster.bench.broadcast", "_worker", json.dumps(cfg)]
            workers.append(cl.spawn(cmd, host=f"h{w % args.hosts}"))
    task = progress.add_task(f"{arm}: {actors} actors x {mb:g} MiB", total=args.versions)
    try:
        wait_ready(workers, setup.get("pub"))
        roles = {
            "actors": [p.pid for p in workers],
            "redis": [cl.redis_proc.pid],
            "nodes": setup.get("pids", []),
        }
        samples, per_version, shared, cpu0 = [], [], 0, {}
        keys = Keys(setup["run"])
        enc = codecs.Encoder(args.codec, keyframe_every=args.keyframe_every) if mode == "tree" else None
        warmup = warmup_versions(args)
        warm_rows = []
        for i in range(warmup + args.versions):
            if i == warmup:  # one-time costs are behind us: count from here
                cpu0 = {role: cpu_s(pids) for role, pids in roles.items()}
                cpu0["publisher"] = time.process_time()
            state = model(mb, 0)
            state["layers.0.bias"] = state["layers.0.bias"] + np.float32(0.01 * (i + 1))
            manifest, chunks = blob.pack(state, Version(1, i + 1), "mlp", 0, encoder=enc)
            t0 = time.time()
            if mode == "pub":
                payload = b"".join(chunks)
                setup["pub"].send_multipart([json.dumps(manifest.to_fields()).encode(), payload], copy=False)
            else:
                blob.write(cl.r, keys, manifest, chunks)
            publish_s = time.time() - t0  # the sender's own part (the learner's write to Redis)
            times, woke, shared_now = [], [], 0
            for p in workers:
                msg = json.loads(readline(p, VERSION_TIMEOUT_S))
                times += msg["t"]
                shared_now += msg["shared"]
                woke.append(msg.get("woke", min(msg["t"])))
            lat = np.array(times) - t0
            row = {
                "version": str(manifest.version),
                "publish_s": publish_s,
                "p50_s": float(np.percentile(lat, 50)),
                "max_s": float(lat.max()),
            }
            time.sleep(0.3)  # let the tiers settle (and dump their counters): one version at a time
            for tier, files in setup.get("tiers", {}).items():
                counters = [json.loads(f.read_text()) for f in files]
                # When the slowest node of each tier held the whole version.
                row[f"{tier}_landed_s"] = max(c.get("landed_at", 0) for c in counters) - t0
                # The slowest node's way through each stage (cache/node.py `stages`).
                for stage in STAGES:
                    at = [c.get("stages", {}).get(stage) for c in counters]
                    if all(
                        a and c["stages"].get("version") == row["version"]
                        for a, c in zip(at, counters, strict=True)
                    ):
                        row[f"{tier}_{stage}_s"] = max(at) - t0
            row["actors_woke_s"] = min(woke) - t0  # the first worker to hear of it
            row["actors_first_s"] = float(lat.min())
            if i < warmup:
                warm_rows.append(row)
                continue
            per_version.append(row)
            samples += lat.tolist()
            shared += shared_now
            progress.advance(task)
        cpu = {role: cpu_s(pids) - cpu0[role] for role, pids in roles.items()}
        cpu["publisher"] = time.process_time() - cpu0["publisher"]
    finally:
        for p in workers:
            p.stdin.close()  # a worker stops when its stdin closes
        deadline = time.monotonic() + 5
        while any(p.poll() is None for p in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        cl.stop(workers)
    a = np.array(samples)
    stage_keys = [k for k in per_version[0] if k.endswith("_s")] if per_version else []
    return {
        "actors": actors,
        # Where the time goes: each stage's median over the measured versions (see above).
        "stages_p50_s": {
            k: float(np.median([row[k] for row in per_version if k in row])) for k in stage_keys
        },
        "p50_s": float(np.percentile(a, 50)),
        "p99_s": float(np.percentile(a, 99)),
        "max_s": float(a.max()),
        "cpu_s_per_version": sum(cpu.values()) / args.versions,
        "cpu_s_per_version_by_role": {role: c / args.versions for role, c in cpu.items()},
        "versions": per_version,
        "warmup_versions": warm_rows,  # not in the figures above: first-use costs (see `warmup_versions`)
        "actors_ready": len(a) // args.versions,
        "actors_on_shared_copy": shared // args.versions,
    }


def warmup_versions(args: argparse.Namespace) -> int:
    return getattr(args, "warmup", WARMUP_VERSIONS)


def tree_arm(cl: Cluster, arm: str, args: argparse.Namespace, size: int, progress) -> dict:
    """Redis -> [tier-1 nodes] -> one shm leaf per host -> actors; bytes counted per tier."""
    run = f"bench-{uuid.uuid4().hex[:6]}"
    tier1 = [cl.node(run, [[]], f"{arm}-t1-{i}") for i in range(args.tier1 if arm == "tree" else 0)]
    leaves = []
    for h in range(args.hosts):
        parents = [tier1[h % len(tier1)][1], []] if tier1 else [[]]
        leaves.append(cl.node(run, parents, f"{arm}-leaf-{h}", shm=f"{run}-h{h}", host=f"h{h}"))
    nodes = tier1 + leaves
    try:
        setup = {
            "run": run,
            "endpoints": [ep for _, ep, _ in leaves],
            "pids": [p.pid for p, _, _ in nodes],
            "tiers": {"tier1": [f for _, _, f in tier1], "leaf": [f for _, _, f in leaves]}
            if tier1
            else {"leaf": [f for _, _, f in leaves]},
        }
        out = run_arm(cl, arm, args, args.actors, setup, progress)
    finally:
        cl.stop([p for p, _, _ in nodes])  # stopped nodes write their final counters
    top = [json.loads(f.read_text()) for _, _, f in (tier1 or leaves)]
    bottom = [json.loads(f.read_text()) for _, _, f in leaves]
    v = args.versions + warmup_versions(args)  # the node counters include the warm-up versions
    out["bytes_per_version"] = {
        "redis_root": sum(c["upstream_bytes_total"] for c in top) / v,
        "tier1_sent": sum(c["served_bytes_total"] for c in top) / v if tier1 else 0,
        "leaf_sent_over_sockets": sum(c["served_bytes_total"] for c in bottom) / v,
        "leaf_shm_copies": args.hosts,
    }
    out["depth"] = 2 if tier1 else 1
    out["model_bytes_on_wire"] = (
        size if args.codec == "raw" else out["bytes_per_version"]["redis_root"] / len(top)
    )
    return out


def codec_ratios(args: argparse.Namespace) -> dict[str, float]:
    """Bytes on the wire per version over raw, on a slowly drifting model."""
    ratios = {}
    for codec in codecs.CODECS:
        enc = codecs.Encoder(codec, keyframe_every=args.keyframe_every)
        sent = raw = 0
        base = model(min(args.model_mb, 4), 0)
        for i in range(2 * args.keyframe_every):
            st = {k: a + np.float32(0.001 * i) for k, a in base.items()}
            m, _ = blob.pack(st, Version(1, i), "mlp", 0, encoder=enc)
            sent, raw = sent + m.size, raw + m.decoded_size
        ratios[codec] = sent / raw
    return ratios


def main(args: argparse.Namespace) -> int:
    """The bench on this machine, or with --netns across one network namespace per host."""
    if not args.netns:
        return run(args, None)
    reason = netns.unavailable_reason()
    if reason is not None:
        raise UserError(f"--netns: {reason}")
    with netns.Network(["root", *(f"h{h}" for h in range(args.hosts))], rate_mbit=args.rate_mbit) as net:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            # This thread acts as host "root" (Redis, tier 1, the publisher, the PUB arms);
            # what it starts from now on lives there too, zmq's I/O threads included.
            _setns(Path("/run/netns") / net["root"].netns)
            return run(args, net)
        finally:
            _setns(home)
            os.close(home)


def _setns(target: Path | int) -> None:
    fd = os.open(target, os.O_RDONLY) if isinstance(target, Path) else target
    try:
        if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
            raise UserError(
                f"--netns: cannot enter network namespace {target}: {os.strerror(ctypes.get_errno())}"
            )
    finally:
        if fd is not target:
            os.close(fd)


def run(args: argparse.Namespace, net: netns.Network | None) -> int:
    if args.workers <= 0:
        args.workers = max(args.hosts, 2)
    size = sum(a.nbytes for a in model(args.model_mb, 0).values())
    plan = topology.plan(
        topology.Inputs(hosts=args.hosts, actors_per_host=args.actors // args.hosts, model_bytes=size)
    )
    figures: dict = {
        "actors": args.actors,
        "model_mb": args.model_mb,
        "model_bytes": size,
        "hosts": args.hosts,
        "workers": args.workers,
        "versions": args.versions,
        "codec": args.codec,
        "planner": plan.to_dict(),
        "note": "one machine shared by several users: figures are noisy",
        "netns": {"hosts": list(net.hosts), "rate_mbit": args.rate_mbit} if net else None,
    }
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up on SIGTERM as on Ctrl-C
    work = Path(tempfile.mkdtemp(prefix="canopy-bench-"))
    cl = Cluster(work, net)
    ctx = zmq.Context.instance()
    console = Console(stderr=True)
    try:
        with Progress(console=console, transient=False) as progress:
            figures["tree"] = tree_arm(cl, "tree", args, size, progress)
            figures["tree_direct"] = tree_arm(cl, "tree_direct", args, size, progress)
            # (a) flat: every actor GETs from Redis (sampled above the byte budget)
            sample = min(args.actors, max(args.workers, FLAT_BUDGET_BYTES // size))
            flat = run_arm(
                cl,
                "flat",
                args,
                sample,
                {"run": f"flat-{uuid.uuid4().hex[:6]}", "endpoints": [None]},
                progress,
            )
            scale = args.actors / sample
            flat["actors"], flat["sampled_actors"], flat["extrapolated"] = args.actors, sample, scale > 1
            if scale > 1:
                flat["measured"] = {k: flat[k] for k in ("p50_s", "p99_s", "max_s")}
                for k in ("p50_s", "p99_s", "max_s"):
                    flat[k] *= scale
                flat["cpu_s_per_version"] *= scale
            flat["bytes_per_version"] = {"redis_root": size * args.actors}
            figures["flat"] = flat
            # (b) one PUB socket to every actor, with as many actors as the memory allows
            pub = ctx.socket(zmq.PUB)
            pub.setsockopt(zmq.SNDHWM, 16)
            pub.setsockopt(zmq.LINGER, 0)
            pub.bind(f"tcp://{cl.addr}:0")
            ep = pub.getsockopt_string(zmq.LAST_ENDPOINT)
            budget = int(PUB_MEMORY_SHARE * available_memory())
            n_pub = min(args.actors, max(1, budget // size))
            p = run_arm(cl, "pub", args, n_pub, {"run": "pub", "endpoints": [ep], "pub": pub}, progress)
            if n_pub < args.actors:
                p["limited_by"] = (
                    f"memory: {args.actors} subscribers x {size} bytes in flight exceeds the "
                    f"{budget / 2**30:.1f} GiB budget ({PUB_MEMORY_SHARE:.0%} of available); ran with {n_pub}"
                )
            p["bytes_per_version"] = {"pub_socket": size * n_pub}
            figures["pub"] = p
            # (c) lower bound: one copy per host + a tiny notification to every actor
            note = run_arm(
                cl,
                "notify",
                args,
                args.actors,
                {"run": "note", "endpoints": [ep], "pub": pub, "mb": 1e-5},
                progress,
            )
            pub.close(0)
        src = np.ones(size // 4, np.float32)
        dst = np.empty_like(src)
        np.copyto(dst, src)  # the shared slots are mapped once and reused: time a warm copy
        t = time.perf_counter()
        np.copyto(dst, src)
        copy_s = time.perf_counter() - t
        figures["lower_bound"] = {
            "copy_s": copy_s,
            "notify_p50_s": note["p50_s"],
            "notify_p99_s": note["p99_s"],
            "p50_s": copy_s + note["p50_s"],
            "p99_s": copy_s + note["p99_s"],
        }
        figures["codec_bytes_ratio"] = ratios = codec_ratios(args)
    finally:
        cl.close()
        shutil.rmtree(work, ignore_errors=True)
    t, d, f, p, lb = (figures[k] for k in ("tree", "tree_direct", "flat", "pub", "lower_bound"))
    single_host_goal = args.hosts == 1 and args.actors >= 1000 and args.model_mb >= 8
    checks = [
        check(
            "tree p99 publish-to-ready vs flat Redis GETs",
            t["p99_s"],
            "s",
            "< flat",
            f["p99_s"],
            t["p99_s"] < f["p99_s"],
        ),
        check(
            "tree p99 publish-to-ready vs one PUB socket",
            t["p99_s"],
            "s",
            "< pub",
            p["p99_s"],
            t["p99_s"] < p["p99_s"],
        ),
        check(
            f"tree p99, {args.model_mb:g} MiB to {args.actors} actors on {args.hosts} host(s)",
            t["p99_s"],
            "s",
            "<= 0.050" if single_host_goal else "report (goal set for --hosts 1 --actors 1000 --model-mb 8)",
            lb["p99_s"],
            t["p99_s"] <= 0.050 or not single_host_goal,
        ),
        check(
            "latency a tier adds (tree depth 2 - depth 1, p50)",
            t["p50_s"] - d["p50_s"],
            "s",
            "report (cut-through: small next to one model transfer)",
            d["p50_s"],
            True,
        ),
        check(
            "Redis root bytes per version",
            t["bytes_per_version"]["redis_root"],
            "bytes",
            "<= root fan-out x model size (not x actors)",
            f["bytes_per_version"]["redis_root"],
            t["bytes_per_version"]["redis_root"] <= args.tier1 * t["model_bytes_on_wire"] * 1.01,
        ),
        check(
            "int8delta bytes vs raw",
            ratios["int8delta"],
            "ratio",
            "<= 0.30",
            1.0,
            ratios["int8delta"] <= 0.30,
        ),
        check("bf16 bytes vs raw", ratios["bf16"], "ratio", "report (0.5 by design)", 1.0, True),
        check(
            "every actor ready each version, on its host's shared copy",
            t["actors_on_shared_copy"],
            "actors",
            f"= {args.actors}",
            t["actors_ready"],
            t["actors_ready"] == t["actors_on_shared_copy"] == args.actors,
        ),
    ]
    write(args.json, "broadcast", figures, checks)
    keys = ("actors", "p50_s", "p99_s", "max_s", "cpu_s_per_version")
    print(
        json.dumps(
            {a: {k: figures[a][k] for k in keys} for a in ("tree", "tree_direct", "flat", "pub")}
            | {"lower_bound": lb},
            indent=1,
        )
    )
    return 0 if all(c["met"] for c in checks) else 1


# ---- simulated actors (one worker process each serves many) ---------------------------
def worker(cfg: dict) -> None:
    """Simulated actors: own sockets each, own policy object each; prints ready times.

    Prints {"ready": true} once every actor is attached, then per version
    {"t": [unix time each actor could act], "shared": how many act on the host's copy}.
    Stops when stdin closes.
    """
    from actors.policy import MLPPolicy

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
        self.by_fd = {}
        for s in socks:
            fd = s.getsockopt(zmq.FD)
            self.by_fd[fd] = s
            self.epoll.register(fd, select.EPOLLIN)
        self.pending = set(socks)  # messages may have queued before the first signal

    def recheck(self, socks) -> None:
        self.pending.update(socks)

    def wait(self, timeout_s: float) -> list[zmq.Socket]:
        events = self.epoll.poll(0 if self.pending else timeout_s)
        candidates = self.pending | {self.by_fd[fd] for fd, _ in events}
        self.pending = set()
        return [s for s in candidates if s.getsockopt(EVENTS) & POLLIN]


def _tree_actors(ctx: zmq.Context, cfg: dict, n: int):
    from cache.client import ClientCore, HostWatch

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

    def step(policy_cls) -> tuple[list, int, object] | None:
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


def _pub_actors(ctx: zmq.Context, cfg: dict, n: int):
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

    def step(policy_cls) -> tuple[list, int, object] | None:
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


def _flat_actors(ctx: zmq.Context, cfg: dict, n: int):
    keys = Keys(cfg["run"])
    pw = Path(cfg["pw"]).read_text()
    conns = [redis.Redis(*cfg["redis"], username="canopy", password=pw) for _ in range(n)]
    for c in conns:
        c.ping()
    ps = conns[0].pubsub(ignore_subscribe_messages=True)
    ps.subscribe(keys.model_notify)
    while ps.get_message(timeout=0.1) is None and not ps.subscribed:
        pass

    def step(policy_cls) -> tuple[list, int, object] | None:
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
    if sys.argv[1] == "_worker":
        if os.environ.get("CANOPY_BENCH_PROFILE"):  # a directory: one cProfile dump per worker
            import cProfile

            prof = cProfile.Profile()
            try:
                prof.runcall(worker, json.loads(sys.argv[2]))
            finally:
                prof.dump_stats(f"{os.environ['CANOPY_BENCH_PROFILE']}/worker-{os.getpid()}.prof")
        else:
            worker(json.loads(sys.argv[2]))
