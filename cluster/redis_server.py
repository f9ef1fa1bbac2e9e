"""`canopy redis --id N`: run Redis shard N as a real `redis-server`, no disk persistence.

The shard's config file (mode 600, in the run directory) turns the default user off and
creates the operator user `cluster.redis_user` with the generated password, so the
password never appears on a command line. The process then *becomes* redis-server
(exec), so its pid is the one in cluster.json.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from cluster.config import Config
from cluster.errors import UserError
from cluster.redisconn import read_password

INSTALL_HINT = "install it with `apt-get install redis-server` (Debian/Ubuntu) or put it on PATH"


def binary() -> str:
    path = shutil.which("redis-server")
    if path is None:
        raise UserError(f"redis-server not found: {INSTALL_HINT}")
    return path


def version() -> str:
    out = subprocess.run([binary(), "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"v=(\S+)", out)
    return match.group(1) if match else out.strip()


def write_conf(cfg: Config, ident: int) -> Path:
    if ident >= len(cfg.cluster.redis):
        raise UserError(f"redis shard {ident} has no address: cluster.redis lists {len(cfg.cluster.redis)}")
    host, _, port = cfg.cluster.redis[ident].rpartition(":")
    workdir = Path(cfg.run.dir or ".").resolve() / f"redis-{ident}"
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "redis.conf"
    lines = [
        f"port {port}",
        f"bind {'* -::*' if cfg.cluster.bind_all else host}",
        "protected-mode yes",
        'save ""',
        "appendonly no",
        f"maxmemory {cfg.redis.maxmemory_mb}mb",
        "maxmemory-policy noeviction",
        f"dir {workdir}",
        "daemonize no",
        "user default off",
        f"user {cfg.cluster.redis_user} on >{read_password(cfg.cluster)} ~* &* +@all",
    ]
    fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    return conf


def exec_server(cfg: Config, ident: int) -> None:
    """Replace this process with redis-server for shard `ident`."""
    server = binary()
    conf = write_conf(cfg, ident)
    os.execv(server, [server, str(conf)])
