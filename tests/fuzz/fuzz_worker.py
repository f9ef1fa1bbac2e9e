"""A replay shard or a cache node in its own process, for tests/fuzz/ to throw bytes at and
for the CURVE authorization tests (tests/integration/replay/test_replay_authorization.py,
tests/integration/cache/test_cache_authorization.py) to call.

Usage: python fuzz_worker.py replay [KEYS_DIR]
       python fuzz_worker.py cache PORT USER PASSWORD_FILE RUN [KEYS_DIR] [tls]
With KEYS_DIR (made by `canopy keys`) the server holds its own CURVE keys from there, as
`canopy replay|cache` would with `cluster.curve_dir`; with `tls` the cache node's Redis is
TLS-only (CANOPY_TEST_TLS=1), its CA beside the password file. Prints `ready <endpoint>
[<notify>]` (the ROUTER the tests talk to, and a cache node's PUB) once bound, serves until
SIGTERM or until DEADLINE_S, so a worker never outlives a test that forgot it, and prints
`counters <json>` as it stops.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from pathlib import Path

from canopy import curve
from canopy.config import CacheConfig, ClusterConfig, ReplayConfig
from canopy.keys import Keys
from canopy.redisconn import connect

DEADLINE_S = 600.0


def main() -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    deadline = threading.Timer(DEADLINE_S, stop.set)
    deadline.daemon = True
    deadline.start()
    role, args = sys.argv[1], sys.argv[2:]
    tls = "tls" in args
    args = [a for a in args if a != "tls"]
    keys_dir = args[0 if role == "replay" else 4 :][:1]
    curve.use(curve.load_dir(Path(keys_dir[0]), role) if keys_dir else None)
    if role == "replay":
        from canopy.replay.server import ReplayServer

        # A small shard so that a fuzzer's lucky valid inserts cannot grow memory by much.
        server = ReplayServer(ReplayConfig(capacity=1000, min_size=1, samples_per_insert=0.0, max_frame_mb=1))
        endpoints = [server.bind("tcp://127.0.0.1:0")]
    else:
        from canopy.cache.node import CacheNode

        port, user, password_file, run = args[:4]
        cluster = ClusterConfig(
            redis=[f"127.0.0.1:{port}"], redis_user=user, password_file=password_file, tls=tls
        )
        r = connect(cluster, "cache", 0)
        server = CacheNode(CacheConfig(poll_s=0.2), r, Keys(run))
        endpoints = list(server.bind("tcp://127.0.0.1:0", "tcp://127.0.0.1:0"))
    print("ready", *endpoints, flush=True)
    server.serve(stop)
    counters = {k: v for k, v in server.counters.items() if isinstance(v, int | float | str)}
    print("counters", json.dumps({**counters, "curve_refused_total": curve.refused_total()}), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
