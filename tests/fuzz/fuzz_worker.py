"""A replay shard or a cache node in its own process, for tests/fuzz/ to throw bytes at.

Usage: python fuzz_worker.py replay
       python fuzz_worker.py cache PORT USER PASSWORD_FILE RUN [tls]
Prints `ready <endpoint>` (the ROUTER the fuzzer talks to) and serves until SIGTERM or
until DEADLINE_S, so a worker never outlives a test that forgot it.
"""

from __future__ import annotations

import signal
import sys
import threading

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
    if sys.argv[1] == "replay":
        from canopy.replay.server import ReplayServer

        # A small shard so that a fuzzer's lucky valid inserts cannot grow memory by much.
        server = ReplayServer(ReplayConfig(capacity=1000, min_size=1, samples_per_insert=0.0, max_frame_mb=1))
        endpoint = server.bind("tcp://127.0.0.1:0")
    else:
        from canopy.cache.node import CacheNode

        port, user, password_file, run = sys.argv[2:6]
        tls = sys.argv[6:7] == ["tls"]  # a TLS-only Redis (CANOPY_TEST_TLS=1), its CA beside the password
        cluster = ClusterConfig(
            redis=[f"127.0.0.1:{port}"], redis_user=user, password_file=password_file, tls=tls
        )
        r = connect(cluster, "cache", 0)
        server = CacheNode(CacheConfig(poll_s=0.2), r, Keys(run))
        endpoint, _ = server.bind("tcp://127.0.0.1:0", "tcp://127.0.0.1:0")
    print("ready", endpoint, flush=True)
    server.serve(stop)
    sys.exit(0)


if __name__ == "__main__":
    main()
