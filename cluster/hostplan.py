"""`canopy hosts plan CONFIG`: the role commands each host of a bare-metal cluster runs.

The same command builder serves `canopy up` (every role on this machine) and this plan
(every role on the host its `[cluster]` address names), so the commands an operator copies
onto each host are the ones the launcher runs and the netns test exercises. Roles that
listen (Redis shards, replay shards, cache nodes) go to the host of their address; learners,
the evaluator and actors connect out only and go where `--place ROLE=HOST[,HOST...]` says.

Example:
    cfg = config.load("cluster.toml")
    for host, commands in plan(cfg, "cluster.toml", {"actor": ["10.0.0.5", "10.0.0.6"]}).items():
        print(host, [shlex.join(c) for c in commands])
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence

from canopy.config import Config
from canopy.errors import UserError

# Roles without a listening address; each may be placed with --place.
PLACED_ROLES = ("learner", "evaluator", "actor")
UNPLACED = "any host"


def role_command(
    role: str, ident: int, config_path: str, args: Sequence[str] = (), program: Sequence[str] = ("canopy",)
) -> list[str]:
    """The command line that runs role process `ident` of the cluster in `config_path`."""
    return [*program, role, "--config", str(config_path), "--id", str(ident), *args]


def role_processes(cfg: Config) -> list[tuple[str, int, tuple[str, ...]]]:
    """Every role process of the cluster as (role, id, extra flags), in start order.

    Redis shards first: every other role connects to shard 0 as it starts.
    """
    c = cfg.cluster
    procs: list[tuple[str, int, tuple[str, ...]]] = [("redis", i, ()) for i in range(len(c.redis))]
    procs += [("replay", i, ()) for i in range(len(c.replay))]
    procs += [("cache", i, ()) for i in range(min(len(c.cache_fetch), len(c.cache_notify)))]
    # Learner 0 takes the lease (rank 0); 1..N-1 follow it in a data-parallel group
    # (learner/group.py); N is the warm standby.
    n = cfg.learner.learners
    procs += [("learner", i, ()) for i in range(n)]
    if cfg.checkpoint.standby:
        procs.append(("learner", n, ("--standby",)))
    procs.append(("evaluator", 0, ()))
    procs += [("actor", i, ()) for i in range(cfg.actors.count)]
    return procs


def plan(
    cfg: Config, config_path: str, placement: dict[str, list[str]], program: Sequence[str] = ("canopy",)
) -> dict[str, list[list[str]]]:
    """Host -> its role commands in start order; hosts that run Redis come first.

    `placement` maps a role of PLACED_ROLES to hosts, used round-robin by id (a learner
    standby goes to the second host listed, when there is one). Unplaced roles go under
    UNPLACED.
    """
    c = cfg.cluster
    missing = [name for name in ("redis", "replay", "cache_fetch", "cache_notify") if not getattr(c, name)]
    if missing:
        raise UserError(
            f"{config_path} lists no address for {', '.join(missing)}: add every listening address "
            "to its [cluster] section (see deploy/cluster.toml)"
        )
    if not cfg.run.name or not c.password_file:
        raise UserError(
            f"{config_path} must set run.name (every role's Redis keys live under canopy:<name>:) "
            "and cluster.password_file (the Redis password, the same file on every host)"
        )
    if cfg.learner.learners > 1 and not c.learner_store:
        raise UserError(
            f"{config_path}: learner.learners = {cfg.learner.learners} needs cluster.learner_store "
            "(host:port where rank 0, on the learner host, serves the group's rendezvous)"
        )
    unknown = sorted(set(placement) - set(PLACED_ROLES))
    if unknown:
        raise UserError(
            f"cannot place {', '.join(unknown)}: only {', '.join(PLACED_ROLES)} are placed by hand; "
            "the others run on the host of their [cluster] address"
        )
    listening = {"redis": c.redis, "replay": c.replay, "cache": c.cache_fetch}
    hosts: dict[str, list[list[str]]] = {}
    for role, ident, args in role_processes(cfg):
        if role in listening:
            host = _host_of(listening[role][ident])
        elif placement.get(role):
            places = placement[role]
            host = places[ident % len(places)]
        else:
            host = UNPLACED
        hosts.setdefault(host, []).append(role_command(role, ident, config_path, args, program))
    return hosts


def parse_placement(items: Sequence[str]) -> dict[str, list[str]]:
    """`["actor=h1,h2", "learner=h3"]` -> {"actor": ["h1", "h2"], "learner": ["h3"]}."""
    out: dict[str, list[str]] = {}
    for item in items:
        role, sep, hosts = item.partition("=")
        names = [h for h in hosts.split(",") if h]
        if not sep or not names:
            raise UserError(f"--place {item!r} must look like ROLE=HOST[,HOST...], e.g. actor=10.0.0.5")
        out.setdefault(role, []).extend(names)
    return out


def render(hosts: dict[str, list[list[str]]], as_json: bool) -> str:
    """The plan as JSON, or as shell lines (each backgrounded) under a comment per host."""
    if as_json:
        return json.dumps({"hosts": [{"host": h, "commands": cmds} for h, cmds in hosts.items()]}, indent=2)
    lines = [
        "# Run each host's commands there, hosts in this order (Redis shards must answer before",
        "# the other roles start). Every host needs the same config file and cluster.password_file.",
    ]
    for host, commands in hosts.items():
        lines.append(f"\n# {host}")
        lines += [shlex.join(cmd) + " &" for cmd in commands]
    return "\n".join(lines)


def _host_of(address: str) -> str:
    """`tcp://10.0.0.2:5555` or `10.0.0.2:6379` -> `10.0.0.2`."""
    return address.removeprefix("tcp://").rpartition(":")[0]
