"""A real lease holder for tests/fault/test_lease_deadline.py to SIGSTOP or starve of Redis.

Usage: python lease_worker.py PORT PASSWORD_FILE TTL_S MODE
Takes the learner lease with a renewal thread and prints `leased <token>`; then every 5 ms
runs `Lease.check` (MODE idle) or `Lease.check` + a fenced publish (MODE publish), as the
learner's loop does. On the first refusal it prints `fenced <pttl ms> <holder> <message>`,
read from Redis right after, and exits 0.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from canopy.config import ClusterConfig
from canopy.keys import Keys
from canopy.learner.publisher import Publisher
from canopy.lease import Fenced, Lease
from canopy.redisconn import connect

DEADLINE_S = 60.0  # the worker never outlives a test that forgot it


def main() -> None:
    port, password_file, ttl, mode = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
    r = connect(ClusterConfig(redis=[f"127.0.0.1:{port}"], password_file=password_file), "worker", 0)
    lease = Lease(r, Keys("lease"), learner=0, ttl_s=ttl)
    lease.acquire(timeout=10)
    lease.start_renewing(on_lost=lambda: None)
    pub = Publisher(r, Keys("lease"), 0, keep=4, lease=lease)
    print("leased", lease.token, flush=True)
    step = 0
    end = time.monotonic() + DEADLINE_S
    while time.monotonic() < end:
        try:
            lease.check()
            if mode == "publish":
                step += 1
                pub.publish({"w": np.zeros(4, np.float32)}, step=step, arch="mlp")
        except Fenced as exc:
            # What Redis says right after: reads still run while writes are paused.
            pttl, holder = r.pttl(Keys("lease").lease), lease.holder() or "-"
            print("fenced", pttl, holder, exc, flush=True)
            return
        time.sleep(0.005)
    sys.exit(1)


if __name__ == "__main__":
    main()
