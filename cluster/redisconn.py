"""Connections to the Redis shards, each named `canopy:<role>:<id>` (CLIENT SETNAME)."""

from __future__ import annotations

from pathlib import Path

import redis

from cluster.config import ClusterConfig
from cluster.errors import UserError


def read_password(cluster: ClusterConfig) -> str:
    try:
        return Path(cluster.password_file).read_text().strip()
    except OSError as exc:
        raise UserError(
            f"cannot read the Redis password file {cluster.password_file!r} ({exc.strerror}): "
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
    return redis.Redis(
        host=host,
        port=int(port),
        username=cluster.redis_user,
        password=read_password(cluster),
        client_name=f"canopy:{role}:{ident}",
        socket_timeout=10,
        socket_connect_timeout=5,
        health_check_interval=30,
    )
