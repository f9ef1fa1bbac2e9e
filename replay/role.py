"""`canopy replay --id N`: run replay shard N, bound to `cluster.replay[N]`.

Place in the data flow: the supervisor (cluster/supervisor.py) starts one per entry of
`cluster.replay`; the shard joins the live set in Redis (replay/membership.py), where
actors' and learners' clients find it, and its counters go to Redis as its stats hash.

With `replay.snapshot_dir` set, the shard first restores the newest valid snapshot under
`<snapshot_dir>/shard-<N>/` (replay/snapshot.py), snapshots itself every
`replay.snapshot_interval_s`, and writes a last one when SIGTERM stops it.
"""

from __future__ import annotations

import threading

import zmq

from canopy.config import Config
from canopy.errors import UserError
from canopy.keys import Keys
from canopy.ports import bind_endpoint
from canopy.redisconn import connect
from canopy.replay import snapshot
from canopy.replay.membership import join
from canopy.replay.server import ReplayServer
from canopy.telemetry import Telemetry


def run(cfg: Config, ident: int, stop: threading.Event) -> None:
    """Serve as replay shard `ident` until `stop`; UserError when it has no endpoint or cannot bind it."""
    endpoint = _endpoint(cfg, ident)
    r = connect(cfg.cluster, "replay", ident)
    tel = Telemetry(r, Keys(cfg.run.name), "replay", ident, cfg.run.heartbeat_s)
    snap_dir = snapshot.shard_dir(cfg.replay.snapshot_dir, ident) if cfg.replay.snapshot_dir else None
    server = ReplayServer(cfg.replay, seed=cfg.run.seed * 1000 + ident, snapshot_dir=snap_dir)
    try:
        server.bind(bind_endpoint(endpoint, cfg.cluster.bind_all))
    except zmq.ZMQError as exc:
        raise UserError(
            f"replay shard {ident} cannot bind {endpoint} ({exc.strerror}): "
            "the port is taken; pick another in cluster.replay"
        ) from None
    tel.counters = server.counters  # the stats hash shows the server's live counters
    tel.start()
    tel.set_state("running")
    tel.event("start", endpoint=endpoint)
    if server.restored is not None:
        items = server.stats()["items"]
        snapshot.log(f"replay: shard {ident} restored {server.restored} ({items} items)")
        tel.event("restore", path=str(server.restored), items=items)
    try:
        join(r, Keys(cfg.run.name), ident, endpoint, cfg.replay.member_ttl_s, stop)  # clients find it
        server.serve(stop)
    finally:
        tel.event("stop")
        tel.close()


def _endpoint(cfg: Config, ident: int) -> str:
    if ident >= len(cfg.cluster.replay):
        raise UserError(
            f"replay shard {ident} has no endpoint: cluster.replay lists {len(cfg.cluster.replay)}"
        )
    return cfg.cluster.replay[ident]
