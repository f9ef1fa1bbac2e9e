"""`canopy learner --id N`: sample from replay, train, publish versions.

build (env spaces, network, algorithm, replay client, publisher) -> run (next batch,
update, publish every `publish_every` updates) -> report (stats hash, events).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import torch

from actors.envs import spaces
from cluster.config import Config
from cluster.keys import Keys
from cluster.redisconn import connect
from cluster.telemetry import Telemetry
from learner.algorithms.dqn import DQN, Batch
from learner.network import ARCH, QNetwork
from learner.publisher import Publisher
from replay.client import SampleClient

SAMPLE_TIMEOUT_S = 120.0


def pick_device(choice: str) -> torch.device:
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def run(cfg: Config, ident: int, stop: threading.Event) -> None:
    lc = cfg.learner
    keys = Keys(cfg.run.name)
    r = connect(cfg.cluster, "learner", ident)
    tel = Telemetry(r, keys, "learner", ident, cfg.run.heartbeat_s)
    tel.start()

    torch.manual_seed(cfg.run.seed)
    device = pick_device(lc.device)
    if device.type == "cpu":
        torch.set_num_threads(lc.threads)
    obs_size, n_actions = spaces(cfg.env.id)
    net = QNetwork(obs_size, n_actions, lc.hidden).to(device)
    algo = DQN(net, lc)
    publisher = Publisher(r, keys, ident, lc.keep_versions)
    sampler = SampleClient(
        cfg.cluster.replay, lc.batch_size, lc.samples_in_flight, cfg.replay.max_frame_mb * 2**20
    )

    version = publisher.publish(net.export(), step=0, arch=ARCH)  # actors act with it at once
    c = tel.counters
    c.update(
        updates_total=0,
        versions_published_total=1,
        policy_version=str(version),
        epoch=publisher.epoch,
        loss=0.0,
        q_mean=0.0,
        sample_wait_seconds_total=0.0,
        policy_lag_mean=0.0,
    )
    tel.set_state("running")
    tel.event("start", epoch=publisher.epoch, device=str(device))
    try:
        while not stop.is_set():
            t0 = time.monotonic()
            arrays = sampler.next(timeout=SAMPLE_TIMEOUT_S)
            c["sample_wait_seconds_total"] += time.monotonic() - t0
            stats = algo.update(_to_batch(arrays, device))
            c["updates_total"] = algo.updates
            c.update(loss=stats["loss"], q_mean=stats["q_mean"])
            if algo.updates % 50 == 0:
                # How old the data is, in learner steps (only comparable within one epoch).
                data_steps = arrays["version"] & 0xFFFFFFFF
                c["policy_lag_mean"] = float(version.step - data_steps.mean())
            if algo.updates % lc.publish_every == 0:
                version = publisher.publish(net.export(), step=algo.updates, arch=ARCH)
                c["versions_published_total"] += 1
                c["policy_version"] = str(version)
    finally:
        sampler.close()
        tel.event("stop", updates=algo.updates, version=str(version))
        tel.close()


def _to_batch(arrays: dict[str, np.ndarray], device: torch.device) -> Batch:
    def t(name: str) -> torch.Tensor:
        # Frames from the socket are read-only; np.require copies them into writable memory.
        return torch.from_numpy(np.require(arrays[name], requirements="W")).to(device, non_blocking=True)

    return Batch(
        obs=t("obs"),
        action=t("action"),
        reward=t("reward"),
        next_obs=t("next_obs"),
        discount=t("discount"),
    )
