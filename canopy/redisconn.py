"""Connections to the Redis shards, each named `canopy:<role>:<id>` (CLIENT SETNAME).

Every redis-py client of a role is made here: with `cluster.tls` it speaks TLS and checks
the shard's certificate against the run's CA (`tls_dir`, canopy/tls.py); cache/rawget.py
takes the same settings from the client it is given.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import redis

from canopy import tls
from canopy.config import ClusterConfig
from canopy.errors import UserError

# Processes that are not roles but only read (status, probes, the operator tools of
# cluster/connection.py) use the read-only user.
READERS = {name: "status" for name in ("status", "health", "export", "eval", "plot", "checkpoint", "resume")}


def role_password_file(cluster: ClusterConfig, user: str) -> Path:
    """Where the password of a role's Redis user lives: beside `cluster.password_file`."""
    return Path(cluster.password_file).with_name(f"redis.{user}.password")


def tls_dir(cluster: ClusterConfig) -> Path:
    """The directory of the run's TLS files (canopy/tls.py): `tls/` beside the password files."""
    return Path(cluster.password_file).with_name("tls")


def credentials(cluster: ClusterConfig, role: str, ident: int | str | None = None) -> tuple[str, Path]:
    """(Redis user, password file) for process `ident` of `role`.

    With `cluster.role_users`, each role has its own least-privilege user (canopy/acl.py),
    and with `cluster.actor_users` each actor (an integer `ident`) its own; anything else
    (the launcher, benchmarks, tests) is an operator and uses `redis_user`.
    """
    from canopy import acl

    if cluster.actor_users and role == "actor" and isinstance(ident, int):
        user = acl.actor_user(ident)
        return user, role_password_file(cluster, user)
    user = READERS.get(role, role)
    if cluster.role_users and user in acl.ROLES:
        return user, role_password_file(cluster, user)
    return cluster.redis_user, Path(cluster.password_file)


def read_password(cluster: ClusterConfig, path: str | Path | None = None) -> str:
    """The password in `path` (default `cluster.password_file`); a UserError when unreadable."""
    path = Path(path or cluster.password_file)
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise UserError(
            f"cannot read the Redis password file {str(path)!r} ({exc.strerror}): "
            "set cluster.password_file to the file canopy up wrote"
        ) from None


def connect(cluster: ClusterConfig, role: str, ident: int | str, shard: int = 0) -> redis.Redis:
    """A client for Redis shard `shard` that names itself after the calling role.

    Example:
        r = connect(cfg.cluster, "learner", 0)
        r.get(keys.model_latest)
    """
    if not cluster.redis:
        raise UserError("cluster.redis is empty: list the Redis shards as host:port")
    host, _, port = cluster.redis[shard].rpartition(":")
    user, password_file = credentials(cluster, role, ident)
    return redis.Redis(
        host=host,
        port=int(port),
        username=user,
        password=read_password(cluster, password_file),
        client_name=f"canopy:{role}:{ident}",
        socket_timeout=10,
        socket_connect_timeout=5,
        health_check_interval=30,
        **tls_kwargs(cluster),
    )


def tls_kwargs(cluster: ClusterConfig) -> dict[str, Any]:
    """redis-py's keyword arguments for `cluster.tls`: verify the shard against the run's CA."""
    if not cluster.tls:
        return {}
    return {
        "ssl": True,
        "ssl_ca_certs": str(tls.ca_file(tls_dir(cluster))),
        "ssl_cert_reqs": "required",
        "ssl_check_hostname": True,
        "ssl_min_version": ssl.TLSVersion.TLSv1_2,
    }
