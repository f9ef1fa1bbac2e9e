"""Publishes policy versions to the Redis root and retires old ones.

Version ids are (epoch, step): the epoch is taken once per learner start from the Redis
counter `learner:epoch`, so ids never repeat after a restart.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import redis

from cache import blob
from cluster.keys import Keys
from cluster.version import Version


class Publisher:
    """Example:
    pub = Publisher(r, keys, learner_id=0, keep=8)
    version = pub.publish(net.export(), step=100, arch="mlp")
    """

    def __init__(self, r: redis.Redis, keys: Keys, learner_id: int, keep: int):
        self.r, self.keys, self.learner_id, self.keep = r, keys, learner_id, keep
        self.epoch = int(r.incr(keys.epoch))
        self.published: deque[blob.Manifest] = deque()

    def publish(self, state: dict[str, np.ndarray], step: int, arch: str) -> Version:
        version = Version(self.epoch, step)
        manifest, chunks = blob.pack(state, version, arch, self.learner_id)
        blob.write(self.r, self.keys, manifest, chunks)
        self.published.append(manifest)
        while len(self.published) > self.keep:
            blob.delete(self.r, self.keys, self.published.popleft())
        return version
