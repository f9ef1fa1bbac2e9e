"""`canopy redis --id N`: run Redis shard N as a real `redis-server`, persisted in the run directory.

Persistence (`redis.persist`, on by default): an append-only file under
`<run dir>/redis-<id>/appendonlydir`, fsynced once a second by Redis's background thread,
no RDB snapshots. Why this and not an RDB saved at shutdown: a shard killed with -9 (or by
the launcher's death signal) comes back with all but the last second of writes, so the
epoch counter, the lease history and every committed checkpoint survive a crash, not only
a clean stop; and the training path pays only a write into the page cache per command
(no fsync per write, as `appendfsync always` would, and no fork of the whole dataset every
few changes, as periodic RDB saves would). The AOF is compacted by Redis's own rewrite
(a fork writing the whole dataset) once it has doubled *and* reached twice `maxmemory`:
checkpoints delete their predecessors, so the dataset stays flat while the AOF grows by
every checkpoint written, and Redis's default threshold (64 MB) rewrote a shard almost
every checkpoint; measured with `canopy bench checkpoint` (128 MB state, 4 shards on this
2-core machine), that cost the training loop 7-9% against 0.0-1.3% with the rewrites held
back. So disk use per shard stays under about 3x `maxmemory`, and a rewrite comes every
2x `maxmemory` of writes (minutes apart). During a rewrite fsyncs pause
(`no-appendfsync-on-rewrite`) so a busy disk never stalls a checkpoint write.
`canopy up --resume` starts the shards on the same directories, so they load their data back.

The shard's config file (mode 600, in the run directory) turns the default user off (no
connection can use it) and creates the operator user `cluster.redis_user` with the
generated password, so the password never appears on a command line. The process then
*becomes* redis-server (exec), so its pid is the one in cluster.json.

With `cluster.tls` the shard listens on its port with TLS only (`port 0`, `tls-port`), with
the certificate and key in `tls/` beside the password files (canopy/tls.py); clients need no certificate of
their own (`tls-auth-clients no`): they authenticate with their user's password.
`tls-replication yes` makes a replica an operator adds with REPLICAOF sync over TLS too
(canopy itself replicates checkpoints from the client side, cache/ and learner/checkpoint/).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from canopy import acl, tls
from canopy.config import Config
from canopy.errors import UserError
from canopy.redisconn import read_password, role_password_file, tls_dir

PERSIST = [
    "appendonly yes",
    "appendfsync everysec",
    "aof-use-rdb-preamble yes",
    "no-appendfsync-on-rewrite yes",
]
INSTALL_HINT = "install it with `apt-get install redis-server` (Debian/Ubuntu) or put it on PATH"


def binary() -> str:
    """The path of redis-server on PATH; a UserError saying how to install it otherwise."""
    path = shutil.which("redis-server")
    if path is None:
        raise UserError(f"redis-server not found: {INSTALL_HINT}")
    return path


def version() -> str:
    """The version redis-server reports (its `v=` field)."""
    out = subprocess.run([binary(), "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"v=(\S+)", out)
    return match.group(1) if match else out.strip()


def write_conf(cfg: Config, ident: int) -> Path:
    """Write shard `ident`'s redis.conf (mode 600: it holds passwords) in its directory; its path."""
    if ident >= len(cfg.cluster.redis):
        raise UserError(f"redis shard {ident} has no address: cluster.redis lists {len(cfg.cluster.redis)}")
    host, _, port = cfg.cluster.redis[ident].rpartition(":")
    workdir = Path(cfg.run.dir or ".").resolve() / f"redis-{ident}"
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "redis.conf"
    lines = [
        *(tls_lines(tls_dir(cfg.cluster), port) if cfg.cluster.tls else [f"port {port}"]),
        f"bind {'* -::*' if cfg.cluster.bind_all else host}",
        "protected-mode yes",
        'save ""',
        *(PERSIST if cfg.redis.persist else ["appendonly no"]),
        *([f"auto-aof-rewrite-min-size {2 * cfg.redis.maxmemory_mb}mb"] if cfg.redis.persist else []),
        f"maxmemory {cfg.redis.maxmemory_mb}mb",
        "maxmemory-policy noeviction",
        f"dir {workdir}",
        "daemonize no",
        # Off, so no connection can use it; but with every permission, because Redis 7
        # replays an AOF's MULTI/EXEC (every Lua script's writes) as the default user and
        # would drop them with NOPERM (redis/redis#14541) otherwise.
        "user default off resetpass ~* &* +@all",
        f"user {cfg.cluster.redis_user} on >{read_password(cfg.cluster)} ~* &* +@all",
    ]
    if cfg.cluster.role_users:
        for role in acl.ROLES:
            if role == "actor" and cfg.cluster.actor_users:
                continue  # no shared actor user: each actor has its own, below
            password = read_password(cfg.cluster, role_password_file(cfg.cluster, role))
            lines.append(acl.user_line(role, cfg.run.name, password))
    if cfg.cluster.actor_users:
        for ident in range(cfg.actors.count):
            user = acl.actor_user(ident)
            password = read_password(cfg.cluster, role_password_file(cfg.cluster, user))
            lines.append(acl.actor_user_line(ident, cfg.run.name, password))
    fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    return conf


def tls_lines(directory: str | Path, port: int | str) -> list[str]:
    """redis.conf lines for a TLS-only shard on `port` with the files in `directory` (module docstring)."""
    ca, cert, key = tls.server_files(directory)
    return [
        "port 0",
        f"tls-port {port}",
        f"tls-cert-file {cert.resolve()}",
        f"tls-key-file {key.resolve()}",
        f"tls-ca-cert-file {ca.resolve()}",
        "tls-auth-clients no",
        "tls-replication yes",
        'tls-protocols "TLSv1.2 TLSv1.3"',
    ]


def exec_server(cfg: Config, ident: int) -> None:
    """Replace this process with redis-server for shard `ident`."""
    server = binary()
    conf = write_conf(cfg, ident)
    os.execv(server, [server, str(conf)])
