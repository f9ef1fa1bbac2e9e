"""One cache node as its own process, wired by command-line flags instead of a run's config.

For the broadcast benchmark and the fault tests, which build trees of real node processes
(and kill them): `python -m canopy.cache.standalone --run R --redis H:P --user U --password-file F
--parents '[["tcp://..", "tcp://.."], []]' --name n1 [--shm-tag T] [--counters FILE] [--tls]`.
With --tls Redis is TLS-only and checked against `tls/ca.crt` beside F (cluster.tls).
An empty parent entry is the Redis root. Prints one JSON line {fetch, notify} once bound,
writes its counters to FILE every 0.2 s and on exit, and stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import threading
from pathlib import Path

import redis

from canopy.cache.node import CacheNode
from canopy.cache.upstream import Parent
from canopy.config import CacheConfig, ClusterConfig
from canopy.keys import Keys
from canopy.redisconn import tls_kwargs


def main(argv: list[str] | None = None) -> int:
    """Run one node from command-line flags until SIGTERM or SIGINT; returns the exit code."""
    p = argparse.ArgumentParser(prog="canopy.cache.standalone")
    p.add_argument("--run", required=True)
    p.add_argument("--redis", default="")
    p.add_argument("--user", default="canopy")
    p.add_argument("--password-file", default="")
    p.add_argument("--parents", default="[[]]", help="JSON list of [fetch, notify] or [] for Redis")
    p.add_argument("--name", default="node")
    p.add_argument("--shm-tag", default="")
    p.add_argument("--bind", default="tcp://127.0.0.1:0")
    p.add_argument("--counters", default="")
    p.add_argument("--tls", action="store_true", help="Redis over TLS, its CA in tls/ beside --password-file")
    p.add_argument("--set", action="append", default=[], help="CacheConfig field=value (JSON)")
    args = p.parse_args(argv)
    cfg = CacheConfig()
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in {f.name for f in dataclasses.fields(cfg)}:
            raise SystemExit(f"unknown cache config field {key!r}")
        setattr(cfg, key, json.loads(value))
    r = None
    if args.redis:
        host, port = args.redis.rsplit(":", 1)
        password = Path(args.password_file).read_text().strip() if args.password_file else None
        tls = tls_kwargs(ClusterConfig(password_file=args.password_file, tls=args.tls))
        r = redis.Redis(
            host=host, port=int(port), username=args.user, password=password, socket_timeout=5, **tls
        )
        r.client_setname(f"canopy:cache:{args.name}")
    parents = [Parent(*e) if e else Parent() for e in json.loads(args.parents)]
    node = CacheNode(cfg, r, Keys(args.run), parents=parents, name=args.name, shm_tag=args.shm_tag)
    host = args.bind.rsplit(":", 1)[0]
    fetch, notify = node.bind(args.bind, f"{host}:0")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(json.dumps({"fetch": fetch, "notify": notify}), flush=True)

    def dump() -> None:
        if args.counters:
            tmp = Path(args.counters + ".tmp")
            tmp.write_text(json.dumps(node.counters))
            tmp.replace(args.counters)

    def dumper() -> None:
        while not stop.wait(0.2):
            dump()

    threading.Thread(target=dumper, daemon=True).start()
    try:
        node.serve(stop)
    finally:
        dump()
    return 0


if __name__ == "__main__":
    sys.exit(main())
