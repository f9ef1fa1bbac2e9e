"""`canopy cache --id N`: run cache node N of the tree that cache/topology.py plans.

Node N's parent is the node the planner's breadth-first numbering puts above it (the
Redis root for the top tier); its ancestors and then the Redis root are its fallbacks.
"""

from __future__ import annotations

import threading

import zmq

from canopy.cache import topology
from canopy.cache.node import CacheNode
from canopy.cache.upstream import Parent
from canopy.config import Config
from canopy.errors import UserError
from canopy.keys import Keys
from canopy.ports import bind_endpoint
from canopy.redisconn import connect
from canopy.telemetry import Telemetry


def run(cfg: Config, ident: int, stop: threading.Event) -> None:
    """Serve as cache node `ident` until `stop`; UserError when it has no endpoints or cannot bind them."""
    c = cfg.cluster
    if ident >= min(len(c.cache_fetch), len(c.cache_notify)):
        raise UserError(f"cache node {ident} has no endpoints in cluster.cache_fetch/cache_notify")
    keys = Keys(cfg.run.name)
    r = connect(c, "cache", ident)
    fanout = cfg.cache.fanout or topology.for_config(cfg).fanout
    parents = [Parent(c.cache_fetch[p], c.cache_notify[p]) for p in topology.parents_of(ident, fanout)]
    # Every node also serves the actors of its host through shared memory.
    shm_tag = f"{cfg.run.name}-cache{ident}" if cfg.cache.shm else ""
    node = CacheNode(cfg.cache, r, keys, parents=[*parents, Parent()], name=f"cache-{ident}", shm_tag=shm_tag)
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
