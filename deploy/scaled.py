#!/usr/bin/env python3
"""Entrypoint for a scaled service (`docker compose up --scale actor=N`): pick a distinct id.

    canopy-scaled ROLE --config FILE [--set key=value ...]

Every replica of a scaled service starts with the same command line, but every canopy role
needs its own `--id`. This picks one, records "ROLE ID" in /tmp/canopy-id (the health
check reads it), then execs `canopy ROLE --config FILE --id ID [--set ...]`:

1. $CANOPY_ID when set (an operator pinning an id by hand);
2. otherwise the smallest id that no live process of ROLE holds, claimed in Redis shard 0
   with `SET canopy:<run>:deploy:claim:<role>:<id> <token> NX EX 120`. An id is held
   while its claim exists (2 minutes: until the role's own heartbeat is surely
   running) or while its deadline in `canopy:<run>:alive:<role>` is in the future. The
   token is random, kept in /tmp/canopy-id.token; a container that restarts (same
   filesystem) takes back the id it recorded in /tmp/canopy-id, and the id of a replica
   that is gone is reused once its heartbeat has lapsed and its claim expired: ids stay
   in 0..N-1.

Installed in the image as /usr/local/bin/canopy-scaled. $CANOPY_ID_FILE moves /tmp/canopy-id
(tests that run several replicas on one filesystem).
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import sys
import time
from pathlib import Path

ID_FILE = Path(os.environ.get("CANOPY_ID_FILE", "/tmp/canopy-id"))
TOKEN_FILE = Path(f"{ID_FILE}.token")
CLAIM_TTL_S = 120
MAX_ID = 100_000
REDIS_WAIT_S = 60.0


def claim_id(cfg, role: str) -> int:
    import redis

    from canopy.keys import Keys
    from canopy.redisconn import connect

    keys = Keys(cfg.run.name)
    if not TOKEN_FILE.exists():
        TOKEN_FILE.write_text(f"{socket.gethostname()}-{secrets.token_hex(8)}\n")
    token = TOKEN_FILE.read_text().strip().encode()
    r = connect(cfg.cluster, role, f"scaled@{socket.gethostname()}")  # as the role's own Redis user
    deadline = time.monotonic() + REDIS_WAIT_S
    while True:  # the Redis root may still be starting
        try:
            r.ping()
            break
        except (redis.ConnectionError, redis.TimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)

    def claim_key(ident: int) -> str:
        return f"{keys.prefix}deploy:claim:{role}:{ident}"

    def alive(ident: int) -> bool:
        score = r.zscore(keys.alive(role), str(ident))
        return score is not None and score >= time.time()

    # A restarted container (same filesystem) takes back the id it had.
    previous = _recorded_id(role)
    if previous is not None:
        key = claim_key(previous)
        if r.get(key) == token:
            r.set(key, token, ex=CLAIM_TTL_S)
            return previous
        if r.get(key) is None:
            # Its heartbeat may still run for up to 3 periods after our predecessor died.
            lapse = time.monotonic() + 3 * cfg.run.heartbeat_s + 1
            while alive(previous) and time.monotonic() < lapse:
                time.sleep(0.5)
            if not alive(previous) and r.set(key, token, nx=True, ex=CLAIM_TTL_S):
                return previous

    held = {int(m) for m in r.zrangebyscore(keys.alive(role), time.time(), "+inf")}
    for ident in range(MAX_ID):
        if ident in held:
            continue
        key = claim_key(ident)
        if r.set(key, token, nx=True, ex=CLAIM_TTL_S) or r.get(key) == token:
            r.expire(key, CLAIM_TTL_S)
            return ident
    raise SystemExit(f"canopy-scaled: no free {role} id below {MAX_ID}")


def _recorded_id(role: str) -> int | None:
    try:
        recorded_role, _, recorded_id = ID_FILE.read_text().strip().partition(" ")
    except OSError:
        return None
    return int(recorded_id) if recorded_role == role and recorded_id.isdigit() else None


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="canopy-scaled", description=__doc__.split("\n\n")[0])
    parser.add_argument("role")
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)

    from canopy import config as config_mod
    from canopy.errors import ConfigError

    try:
        cfg = config_mod.load(args.config, args.set)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"canopy-scaled: config error: {problem}", file=sys.stderr)
        return 2
    if os.environ.get("CANOPY_ID", "").strip():
        ident = int(os.environ["CANOPY_ID"])
    else:
        ident = claim_id(cfg, args.role)
    ID_FILE.write_text(f"{args.role} {ident}\n")
    print(f"canopy-scaled: {socket.gethostname()} runs {args.role} {ident}", file=sys.stderr, flush=True)
    cmd = ["canopy", args.role, "--config", args.config, "--id", str(ident)]
    for item in args.set:
        cmd += ["--set", item]
    os.execvp(cmd[0], cmd)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
