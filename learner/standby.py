"""`canopy learner --standby`: the standby learner's cold wait, before it imports torch.

Place in the data flow: none yet. A standby exists to take over from the newest checkpoint
quickly (learner/lead.py `take_lease`). Before the run's first checkpoint there is nothing
to take over from, and warming up (importing torch, building the model: 3 CPU-seconds) at
the same time as the lease holder's first updates slows the run exactly when a run is
judged on its time to solve. So the standby waits here first, on Redis only, and warms up
(learner/role.py `run`) as soon as the lease holder has a checkpoint, or is gone.
"""

from __future__ import annotations

import threading

import redis

from canopy.config import Config
from canopy.keys import Keys
from canopy.lease import parse_token
from canopy.redisconn import connect
from canopy.telemetry import Telemetry

POLL_S = 0.2


def run(cfg: Config, ident: int, stop: threading.Event) -> None:
    """Wait cold (state `cold`), then run as the warm standby (state `standby`) until `stop`."""
    keys = Keys(cfg.run.name)
    r = connect(cfg.cluster, "learner", ident)
    tel = Telemetry(r, keys, "learner", ident, cfg.run.heartbeat_s)
    tel.start()
    tel.set_state("cold")
    try:
        while not warm_up_now(r, keys) and not stop.wait(POLL_S):
            pass
    finally:
        tel.close("cold")  # learner/role.py's telemetry takes the stats hash over
    if stop.is_set():
        return
    from canopy.learner import role

    role.run(cfg, ident, stop, standby=True)


def warm_up_now(r: redis.Redis, keys: Keys) -> bool:
    """Whether the lease holder has a checkpoint to take over from, or the run lost it.

    In doubt (the root shard not answering) the answer is yes: a warm standby costs CPU, a
    cold one costs recovery time.
    """
    try:
        holder = parse_token(r.get(keys.lease))
        if holder is None:
            return bool(r.exists(keys.epoch))  # a lease was taken before: its holder is gone
        total, restored = r.hmget(keys.proc("learner", holder[1]), "checkpoints_total", "checkpoint")
    except (redis.RedisError, ValueError):  # ValueError: a lease value not `<epoch>:<owner>`
        return True
    return int(total or 0) > 0 or (restored or b"-") != b"-"
