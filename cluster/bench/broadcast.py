"""`canopy bench broadcast`: time from publish to "actor can act with it", tree vs baselines.

Measures the model data flow end to end with real processes: a redis-server root, a tier
of cache nodes, one leaf node per simulated host (shared-memory ring), and simulated
actors, many per worker process, each with its own sockets and its own policy object
(`MLPPolicy` on read-only views of the host copy, or on its private copy). In the same
run, three baselines: (a) flat: every actor GETs each version from Redis itself; (b) one
ZeroMQ PUB socket sending the weights to every actor; (c) the lower bound: one memory copy
of the model per host plus the latency of a small notification to every actor.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import select
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import redis
import zmq

from cache import blob, codecs
from cluster.bench.report import check, write
from cluster.keys import Keys
from cluster.version import Version

VERSION_TIMEOUT_S = 120.0


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

    def __init__(self, work: Path):
        self.work, self.procs = work, []
        self.password = secrets.token_urlsafe(16)
        (work / "pw").write_text(self.password)
        with __import__("socket").socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        conf = work / "redis.conf"
        conf.write_text(
            f'port {self.port}\nbind 127.0.0.1\nsave ""\nappendonly no\ndir {work}\n'
            f"user default off\nuser canopy on >{self.password} ~* &* +@all\n"
            "client-output-buffer-limit pubsub 0 0 0\nclient-output-buffer-limit normal 0 0 0\n"
            "proto-max-bulk-len 1gb\n"
        )
        self.redis_proc = self.spawn([shutil.which("redis-server") or "redis-server", str(conf)], out=False)
        self.r = redis.Redis(port=self.port, username="canopy", password=self.password)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.r.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def spawn(self, cmd: list[str], out: bool = True) -> subprocess.Popen:
        p = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE if out else subprocess.DEVNULL,
            stdin=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[2],
        )
        self.procs.append(p)
        return p

    def node(
        self, run: str, parents: list, name: str, shm: str = ""
    ) -> tuple[subprocess.Popen, list[str], Path]:
        counters = self.work / f"{name}.json"
        p = self.spawn(
            [
                sys.executable,
                "-m",
                "cache.standalone",
                "--run",
                run,
                "--redis",
                f"127.0.0.1:{self.port}",
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
                *(["--shm-tag", shm] if shm else []),
            ]
        )
        eps = json.loads(_readline(p, 30))
        return p, [eps["fetch"], eps["notify"]], counters

    def close(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in reversed(self.procs):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)


def _readline(p: subprocess.Popen, timeout: float) -> str:
    ready, _, _ = select.select([p.stdout], [], [], timeout)
    if not ready:
        raise TimeoutError(f"process {p.args[:4]} said nothing within {timeout}s")
    line = p.stdout.readline()
    if not line:
        raise RuntimeError(f"process {p.args[:4]} exited ({p.poll()})")
    return line


def run_mode(
    cl: Cluster, mode: str, args: argparse.Namespace, run: str, endpoints: list, extra: dict
) -> dict:
    """Start workers, publish `versions` versions, collect per-actor ready times."""
    workers = []
    per = [args.actors // args.workers + (i < args.actors % args.workers) for i in range(args.workers)]
    for w, n in enumerate(per):
        cfg = {
            "mode": mode,
            "actors": n,
            "endpoints": endpoints[w % len(endpoints)],
            "run": run,
            "port": cl.port,
            "pw": str(cl.work / "pw"),
        }
        workers.append(
            cl.spawn([sys.executable, "-m", "cluster.bench.broadcast", "_worker", json.dumps(cfg)])
        )
    for p in workers:
        json.loads(_readline(p, 120))  # ready
    pids = [p.pid for p in workers] + [cl.redis_proc.pid] + extra.get("node_pids", [])
    cpu0 = cpu_s(pids) + time.process_time()
    samples, per_version = [], []
    keys = Keys(run)
    pub = extra.get("pub_sock")
    enc = codecs.Encoder(args.codec, keyframe_every=args.keyframe_every) if mode == "tree" else None
    for i in range(args.versions):
        state = model(args.model_mb, 0)
        state["layers.0.bias"] = state["layers.0.bias"] + np.float32(0.01 * (i + 1))
        v = Version(1, i + 1)
        manifest, chunks = blob.pack(state, v, "mlp", 0, encoder=enc)
        t0 = time.time()
        if mode == "pub":
            pub.send_multipart([str(v).encode(), *chunks], copy=False)
        else:
            blob.write(cl.r, keys, manifest, chunks)
        times = []
        for p in workers:
            msg = json.loads(_readline(p, VERSION_TIMEOUT_S))
            times += msg["t"]
        lat = np.array(times) - t0
        per_version.append(
            {
                "version": str(v),
                "p50_s": float(np.percentile(lat, 50)),
                "max_s": float(lat.max()),
                "codec": manifest.codec,
            }
        )
        samples += lat.tolist()
        time.sleep(0.3)
    cpu = cpu_s(pids) + time.process_time() - cpu0
    for p in workers:
        p.stdin.close()
    a = np.array(samples)
    return {
        "p50_s": float(np.percentile(a, 50)),
        "p99_s": float(np.percentile(a, 99)),
        "max_s": float(a.max()),
        "cpu_s_per_version": cpu / args.versions,
        "versions": per_version,
        "actors_ready": len(a) // args.versions,
    }


def main(args: argparse.Namespace) -> int:
    if args.workers <= 0:
        args.workers = args.hosts
    work = Path(tempfile.mkdtemp(prefix="canopy-bench-"))
    cl = Cluster(work)
    size = sum(a.nbytes for a in model(args.model_mb, 0).values())
    figures: dict = {
        "actors": args.actors,
        "model_mb": args.model_mb,
        "model_bytes": size,
        "hosts": args.hosts,
        "workers": args.workers,
        "versions": args.versions,
        "codec": args.codec,
    }
    try:
        # --- the tree: Redis -> tier-1 nodes -> one leaf per host (shm) -> actors ---------
        run = f"bench-{uuid.uuid4().hex[:6]}"
        tier1 = [cl.node(run, [[]], f"t1-{i}") for i in range(args.tier1)]
        leaves = []
        for h in range(args.hosts):
            parent = tier1[h % len(tier1)][1]
            leaves.append(cl.node(run, [parent, []], f"leaf-{h}", shm=f"{run}-h{h}"))
        time.sleep(1.0)
        node_pids = [p.pid for p, _, _ in tier1 + leaves]
        figures["tree"] = run_mode(
            cl, "tree", args, run, [ep for _, ep, _ in leaves], {"node_pids": node_pids}
        )
        time.sleep(0.5)
        c1 = [json.loads(f.read_text()) for _, _, f in tier1]
        cl_ = [json.loads(f.read_text()) for _, _, f in leaves]
        v = args.versions
        figures["tree"]["bytes_per_version"] = {
            "redis_root": sum(c["upstream_bytes_total"] for c in c1) / v,
            "tier1_sent": sum(c["served_bytes_total"] for c in c1) / v,
            "leaf_sent_over_sockets": sum(c["served_bytes_total"] for c in cl_) / v,
            "leaf_shm_copies": args.hosts,
        }
        figures["tree"]["tier1_nodes"] = args.tier1
        # --- (a) flat: every actor GETs from Redis ----------------------------------------
        figures["flat"] = run_mode(cl, "flat", args, f"flat-{uuid.uuid4().hex[:6]}", [None], {})
        figures["flat"]["bytes_per_version"] = {"redis_root": size * args.actors}
        # --- (b) one PUB socket to every actor --------------------------------------------
        ctx = zmq.Context.instance()
        pub = ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.SNDHWM, 0)
        pub.setsockopt(zmq.LINGER, 0)
        pub.bind("tcp://127.0.0.1:0")
        ep = pub.getsockopt_string(zmq.LAST_ENDPOINT)
        figures["pub"] = run_mode(cl, "pub", args, "pub", [ep], {"pub_sock": pub})
        figures["pub"]["bytes_per_version"] = {"pub_socket": size * args.actors}
        # --- (c) lower bound: one copy per host + a small notification to everyone --------
        small = argparse.Namespace(**{**vars(args), "model_mb": 1e-5})
        note = run_mode(cl, "pub", small, "note", [ep], {"pub_sock": pub})
        pub.close(0)
        src = np.ones(size // 4, np.float32)
        dst = np.empty_like(src)
        t = time.perf_counter()
        np.copyto(dst, src)
        copy_s = time.perf_counter() - t
        figures["lower_bound"] = {
            "copy_s": copy_s,
            "notify_p50_s": note["p50_s"],
            "notify_p99_s": note["p99_s"],
            "p99_s": copy_s + note["p99_s"],
            "p50_s": copy_s + note["p50_s"],
        }
        # --- codecs: bytes on the wire per version, on a drifting model --------------------
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
        figures["codec_bytes_ratio"] = ratios
    finally:
        cl.close()
        shutil.rmtree(work, ignore_errors=True)
    t, f, p, lb = figures["tree"], figures["flat"], figures["pub"], figures["lower_bound"]
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
            "tree p99 vs lower bound (one copy per host + notify)",
            t["p99_s"],
            "s",
            "report",
            lb["p99_s"],
            True,
        ),
        check(
            "Redis root bytes per version",
            t["bytes_per_version"]["redis_root"],
            "bytes",
            "= tier-1 nodes x model size (not x actors)",
            f["bytes_per_version"]["redis_root"],
            t["bytes_per_version"]["redis_root"] <= args.tier1 * size * 1.01,
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
            "every actor ready each version",
            t["actors_ready"],
            "actors",
            f"= {args.actors}",
            f["actors_ready"],
            t["actors_ready"] == args.actors,
        ),
    ]
    write(args.json, "broadcast", figures, checks)
    print(
        json.dumps(
            {
                m: {k: figures[m][k] for k in ("p50_s", "p99_s", "max_s", "cpu_s_per_version")}
                for m in ("tree", "flat", "pub")
            }
            | {"lower_bound": lb},
            indent=1,
        )
    )
    return 0 if all(c["met"] for c in checks) else 1


def worker(cfg: dict) -> None:
    """Simulated actors: own sockets each, own policy object each; prints ready times."""
    from actors.policy import MLPPolicy
    from cache.client import ClientCore

    ctx = zmq.Context.instance()
    n, mode = cfg["actors"], cfg["mode"]
    obs = np.zeros((1, 4), np.float32)
    policies: list = [None] * n
    if mode == "tree":
        cores = [
            ClientCore(
                [tuple(cfg["endpoints"])],
                ctx,
                request_timeout_s=30,
                parent_timeout_s=5,
                heartbeat_s=1.0,
                name=f"a{i}",
            )
            for i in range(n)
        ]
        for c in cores:
            c.connect()
        owner = {}
        poller = zmq.Poller()
        for i, c in enumerate(cores):
            for s in c.sockets():
                poller.register(s, zmq.POLLIN)
                owner[s] = i
    elif mode == "pub":
        subs = []
        poller = zmq.Poller()
        owner = {}
        for i in range(n):
            s = ctx.socket(zmq.SUB)
            s.setsockopt(zmq.SUBSCRIBE, b"")
            s.setsockopt(zmq.RCVHWM, 0)
            s.connect(cfg["endpoints"])
            poller.register(s, zmq.POLLIN)
            owner[s] = i
            subs.append(s)
    else:
        keys = Keys(cfg["run"])
        pw = Path(cfg["pw"]).read_text()
        conns = [redis.Redis(port=cfg["port"], username="canopy", password=pw) for _ in range(n)]
        for c in conns:
            c.ping()
        ps = conns[0].pubsub(ignore_subscribe_messages=True)
        ps.subscribe(keys.model_notify)
    time.sleep(1.0)  # slow joiners: every SUB is connected before the first version
    print(json.dumps({"ready": True}), flush=True)
    got = 0
    while True:
        if select.select([sys.stdin], [], [], 0)[0] and not sys.stdin.read(1):
            return
        times: list[float] = []
        current = [None] * n
        if mode == "flat":
            msg = ps.get_message(timeout=0.5)
            if msg is None:
                continue
            v = Version.parse(msg["data"])
            for i, c in enumerate(conns):
                manifest, chunks = blob.read(c, keys, v)
                arrays = blob.unpack(manifest, chunks)
                policies[i] = MLPPolicy.from_arrays(manifest.arch, arrays)
                times.append(time.time())
        else:
            while len(times) < n:
                for sock, _ in poller.poll(100):
                    i = owner[sock]
                    if mode == "tree":
                        update = cores[i].on_readable(sock)
                        if update is None or current[i] == update.version:
                            continue
                        cores[i].acting(update.version)
                        policies[i] = MLPPolicy.from_arrays(update.manifest.arch, update.arrays)
                        current[i] = update.version
                    else:
                        frames = sock.recv_multipart(copy=False)
                        v = frames[0].bytes.decode()
                        if current[i] == v:
                            continue
                        data = b"".join(f.buffer for f in frames[1:]) if len(frames) > 2 else frames[1].buffer
                        if len(data) > 64:
                            arrays = {"w": np.frombuffer(data, np.float32)}  # the private copy
                            policies[i] = arrays
                        current[i] = v
                    times.append(time.time())
                if mode == "tree":
                    for c in cores:
                        c.tick()
        if mode == "tree" and policies[0] is not None:
            policies[0].q_values(obs)  # the shared views really can act
        got += 1
        print(json.dumps({"t": times}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "_worker":
        worker(json.loads(sys.argv[2]))
