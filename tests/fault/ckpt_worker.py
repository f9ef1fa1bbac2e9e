"""A real process that writes checkpoints (and publishes) for the fault tests to SIGKILL/SIGSTOP.

Usage: python ckpt_worker.py PORTS PASSWORD_FILE MODE
MODE transfer: commit A, then write B slowly, printing `chunk` after each acked batch.
MODE commit:   commit A, then write B and sleep after its last chunk is acked (the commit window).
MODE fenced:   take a short lease, print `leased`, wait for stdin, then try to publish and commit.
"""

from __future__ import annotations

import sys
import time

import torch

from canopy.config import ClusterConfig, LearnerConfig
from canopy.keys import Keys
from canopy.learner.algorithms.dqn import DQN
from canopy.learner.checkpoint.placement import make_plan
from canopy.learner.checkpoint.state import Capturer
from canopy.learner.checkpoint.store import CheckpointFenced, CheckpointStore
from canopy.learner.network import QNetwork
from canopy.learner.publisher import Publisher
from canopy.lease import Fenced, Lease
from canopy.redisconn import connect


def main() -> None:
    ports, password_file, mode = sys.argv[1].split(","), sys.argv[2], sys.argv[3]
    cc = ClusterConfig(redis=[f"127.0.0.1:{p}" for p in ports], password_file=password_file)
    clients = [connect(cc, "worker", 0, shard=i) for i in range(len(ports))]
    keys = Keys("fault")
    lease = Lease(clients[0], keys, 0, ttl_s=0.5 if mode == "fenced" else 60.0)
    lease.acquire(timeout=10)
    torch.manual_seed(0)
    algo = DQN(QNetwork(4, 2, [256, 256]), LearnerConfig())
    plan = make_plan([f"h{i}" for i in range(len(ports))], 2)
    rate = 100_000 if mode == "transfer" else 0
    store = CheckpointStore(clients, keys, plan, chunk_bytes=16384, keep=3, rate_bytes_s=rate)
    cap = Capturer()
    if mode == "fenced":
        print("leased", lease.epoch, flush=True)
        sys.stdin.readline()  # the test SIGSTOPs us here, lets the lease expire, then resumes
        pub = Publisher(clients[0], keys, 0, 4, lease=lease)
        try:
            pub.publish(algo.online.export(), step=1, arch="mlp")
            print("published", flush=True)
        except Fenced:
            print("fenced-publish", flush=True)
        try:
            store.write(cap.capture(algo, {}, {}), f"{lease.epoch}.1", lease.token, 0)
            print("committed", flush=True)
        except CheckpointFenced:
            print("fenced-commit", flush=True)
        return
    store.write(cap.capture(algo, {}, {}), f"{lease.epoch}.1", lease.token, 0)
    print("committed-A", flush=True)
    algo.updates = 2
    last = -1

    def on_chunk(i: int) -> None:
        nonlocal last
        last = i
        print("chunk", i, flush=True)
        if mode == "commit" and i == n_chunks - 1:
            print("acked-all", flush=True)
            time.sleep(30)  # killed in here: chunks acked on R shards, manifest not yet written

    snap = cap.capture(algo, {}, {})
    n_chunks = 1 + -(-snap.nbytes // 16384)
    store.write(snap, f"{lease.epoch}.2", lease.token, 0, on_chunk=on_chunk)
    print("committed-B", flush=True)


if __name__ == "__main__":
    main()
