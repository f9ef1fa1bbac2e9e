"""Where an operator tool connects: a run directory, a cluster TOML, or a Redis address.

Place in the data flow: `canopy status`, `eval`, `export`, `plot`, `checkpoint` and
`up --resume` read a run through its Redis shards, where every key they need lives under
every launcher (`canopy up`, compose, Kubernetes, Ray, bare hosts). This module is the one
place that turns what an operator has at hand into the run's config, key names and clients:

- `RUN_DIR` of `canopy up`: its cluster.json and config.toml;
- `--config cluster.toml`: the file every role of a deployment reads;
- `--redis HOST:PORT [--redis ...] --password-file F [--user U] [--run NAME]`: only an
  address (say one `kubectl port-forward` opened); the rest of the config is the run's own,
  which the learner leaves at `run:config` (learner/metrics.py).

Flags override what a TOML or run directory says. Which Redis user: the one `--user` and
`--password-file` name; from a run directory or TOML, the `status` user when
`cluster.role_users` is on, else `cluster.redis_user`. Every tool only reads the run (a
resume writes into its own new shards), so the read-only `status` user of canopy/acl.py is
enough for all of them and is the one to hand out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from canopy import config as config_mod
from canopy.config import Config
from canopy.errors import ConfigError, UserError
from canopy.keys import Keys
from canopy.redisconn import connect

MAX_RUN_CONFIG_BYTES = 256 << 10
MAX_CLUSTER_JSON_BYTES = 16 << 20
RUN_CONFIG_PATTERN = "canopy:*:run:config"
SOURCES_HELP = "RUN_DIR of canopy up, --config FILE, or --redis HOST:PORT --password-file FILE"


@dataclass
class Target:
    """A run to read: its config (addresses, user, env, layout), key names, and, from a
    `canopy up` run directory, that directory and the processes cluster.json lists."""

    cfg: Config
    keys: Keys
    run_dir: Path | None = None
    listed: list[tuple[str, int]] = field(default_factory=list)  # (role, id) from cluster.json
    # False when only an address is known and the run left no `run:config` yet: the env,
    # layout and checkpoint settings are then canopy's defaults, not the run's.
    has_config: bool = True

    def client(self, tool: str, shard: int = 0) -> redis.Redis:
        """A client of shard `shard` named `canopy:<tool>:0`, as the user described above."""
        return connect(self.cfg.cluster, tool, 0, shard)

    def clients(self, tool: str) -> list[redis.Redis]:
        """One client per Redis shard, root first (checkpoints are spread over all of them)."""
        return [self.client(tool, i) for i in range(len(self.cfg.cluster.redis))]

    def where(self) -> str:
        """The root shard's address, for messages."""
        return self.cfg.cluster.redis[0] if self.cfg.cluster.redis else "(no Redis address)"


def add_options(parser: argparse.ArgumentParser, config: bool = True) -> None:
    """The connection flags, shared by every operator tool (`config`: add `--config` too)."""
    group = parser.add_argument_group("connection (instead of a run directory)")
    if config:
        group.add_argument("--config", help="the deployment's cluster TOML (compose, Kubernetes, hosts)")
    group.add_argument(
        "--redis",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="a Redis shard, root first; repeat for every shard (checkpoints, resume)",
    )
    group.add_argument("--password-file", help="password of --user (default: the config's password_file)")
    group.add_argument("--user", help="Redis user (default: the config's; 'status' reads, read-only)")
    group.add_argument("--run", help="the run's name (default: the only run in that Redis)")


def given(args: argparse.Namespace) -> bool:
    """Whether any connection flag was passed."""
    return bool(getattr(args, "config", None) or args.redis or args.password_file or args.user or args.run)


def resolve(args: argparse.Namespace, run_dir: str | Path | None = None) -> Target:
    """The run that `run_dir` or the connection flags of `args` name.

    Raises UserError when none is given, or when the flags do not lead to one run.
    """
    config_file = getattr(args, "config", None)
    if run_dir is not None and config_file:
        raise UserError("pass a run directory or --config, not both")
    if run_dir is not None:
        target = from_run_dir(Path(run_dir))
    elif config_file:
        target = Target(_load(config_file), Keys(""))
    elif args.redis:
        target = Target(config_mod.load(None), Keys(""), has_config=False)
    else:
        raise UserError(f"which run? pass {SOURCES_HELP}")
    c = target.cfg.cluster
    if args.redis:
        c.redis = [_address(a) for a in args.redis]
    if args.user or args.password_file:
        # Exactly the user and password named: no per-role users beside them.
        c.role_users = False
        c.redis_user = args.user or c.redis_user
        c.password_file = args.password_file or c.password_file
    if not c.password_file:
        raise UserError("no Redis password: pass --password-file FILE (the operator's or the status user's)")
    if args.run:
        target.cfg.run.name = args.run
    address_only = run_dir is None and not config_file
    if address_only or not target.cfg.run.name:
        with contextlib.closing(target.client("status")) as r:
            target.cfg.run.name = target.cfg.run.name or discover_run(r)
            stored = read_run_config(r, Keys(target.cfg.run.name)) if address_only else None
        if stored is not None:
            _adopt(target, stored)
    target.keys = Keys(target.cfg.run.name)
    return target


def from_run_dir(run_dir: Path) -> Target:
    """A `canopy up` run directory: cluster.json (the run and its processes) and config.toml."""
    path = run_dir / "cluster.json"
    try:
        if path.stat().st_size > MAX_CLUSTER_JSON_BYTES:
            raise UserError(f"{path} is over {MAX_CLUSTER_JSON_BYTES >> 20} MiB: not a cluster.json")
        doc = json.loads(path.read_text())
        run, config_path = str(doc["run"]), str(doc["config"])
    except FileNotFoundError:
        raise UserError(f"{path} not found: pass the run directory canopy up printed") from None
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{path} is not a cluster.json of canopy up (no run or config)") from None
    cfg = _load(config_path)
    cfg.run.name = run
    listed = []
    roles = doc.get("roles", {})
    for role, entries in roles.items() if isinstance(roles, dict) else ():
        listed += [(str(role), int(e["id"])) for e in entries if isinstance(e, dict) and "id" in e]
    return Target(cfg, Keys(run), run_dir, listed)


def discover_run(r: redis.Redis) -> str:
    """The name of the only run whose learner left its config in this Redis."""
    runs: set[str] = set()
    try:
        for key in r.scan_iter(match=RUN_CONFIG_PATTERN, count=1000):
            runs.add(key.decode(errors="replace")[len("canopy:") : -len(":run:config")])
            if len(runs) > 20:
                break
    except redis.RedisError as exc:
        raise UserError(f"cannot read Redis at {_where(r)} ({exc})") from None
    if len(runs) != 1:
        found = f"runs {', '.join(sorted(runs))}" if runs else "no run whose learner has started"
        raise UserError(f"Redis at {_where(r)} holds {found}: pass --run NAME")
    return runs.pop()


def read_run_config(r: redis.Redis, keys: Keys) -> Config | None:
    """The run's resolved config from `run:config` (None before its first learner started)."""
    try:
        if r.strlen(keys.run_config) > MAX_RUN_CONFIG_BYTES:
            raise UserError(f"{keys.run_config} is over {MAX_RUN_CONFIG_BYTES >> 10} KiB: not a run config")
        raw = r.get(keys.run_config)
    except redis.RedisError as exc:
        raise UserError(f"cannot read Redis at {_where(r)} ({exc})") from None
    if raw is None:
        return None
    try:
        return config_mod.loads(raw.decode(errors="replace"), source=keys.run_config)
    except ConfigError as exc:
        raise UserError(f"{keys.run_config} does not hold a usable config: {exc.problems[0]}") from None


def require_config(target: Target, what: str) -> None:
    """Refuse a tool that needs the run's env or layout when only an address is known."""
    if not target.has_config:
        raise UserError(
            f"{what} needs the run's config: no learner of run {target.cfg.run.name} has left it in "
            "Redis yet; pass --config FILE"
        )


def _adopt(target: Target, stored: Config) -> None:
    """Take the run's stored config, keeping the connection this tool was given."""
    ours = target.cfg.cluster
    stored.cluster.redis = ours.redis
    stored.cluster.redis_user = ours.redis_user
    stored.cluster.password_file = ours.password_file
    stored.cluster.role_users = ours.role_users
    stored.run.name = target.cfg.run.name
    target.cfg = stored
    target.has_config = True


def _load(path: str | Path) -> Config:
    return config_mod.load(path)


def _address(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"--redis {text!r}: expected HOST:PORT")
    return text


def _where(r: redis.Redis) -> str:
    kw: dict[str, Any] = r.connection_pool.connection_kwargs
    return f"{kw.get('host')}:{kw.get('port')}"
