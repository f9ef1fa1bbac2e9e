"""`canopy cache --id N`: run cache node N under the Redis root."""

from __future__ import annotations

import threading

import zmq

from cache.node import CacheNode
from cluster.config import Config
from cluster.errors import UserError
from cluster.keys import Keys
from cluster.ports import bind_endpoint
from cluster.redisconn import connect
from cluster.telemetry import Telemetry


def run(cfg: Config, ident: int, stop: threading.Event) -> None:
    c = cfg.cluster
    if ident >= min(len(c.cache_fetch), len(c.cache_notify)):
        raise UserError(f"cache node {ident} has no endpoints in cluster.cache_fetch/cache_notify")
    keys = Keys(cfg.run.name)
    r = connect(c, "cache", ident)
    # A leaf under the Redis root also serves actors on its host through shared memory.
    shm_tag = f"{cfg.run.name}-cache{ident}" if cfg.cache.shm else ""
    node = CacheNode(cfg.cache, r, keys, name=f"cache-{ident}", shm_tag=shm_tag)
    try:
        node.bind(
            bind_endpoint(c.cache_fetch[ident], c.bind_all), bind_endpoint(c.cache_notify[ident], c.bind_all)
        )
    except zmq.ZMQError as exc:
        raise UserError(
            f"cache node {ident} cannot bind its endpoints ({exc.strerror}): the port is taken; "
            "pick others in cluster.cache_fetch / cluster.cache_notify"
        ) from None
    tel = Telemetry(r, keys, "cache", ident, cfg.run.heartbeat_s)
    tel.counters = node.counters  # the stats hash shows the node's live counters
    tel.start()
    tel.set_state("running")
    tel.event("start")
    try:
        node.serve(stop)
    finally:
        tel.event("stop")
        tel.close()
