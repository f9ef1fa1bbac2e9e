"""Publishes policy versions to the Redis root and retires old ones.

Version ids are (epoch, step): the epoch is taken once per learner start from the Redis
counter `learner:epoch` (through the lease, canopy/lease.py, when the learner
holds one), so ids never repeat after a restart. With a lease, the step that makes a
version visible (move `model:latest`, notify, ledger entry) is one Lua script that first
checks the lease still carries this learner's token: a fenced learner cannot publish.

Redis stays bounded: the publisher deletes its own versions' blobs beyond the newest `keep`,
and trims the ledger (`ledger:index`, cache/ledger.py) to the newest `keep_ledger` entries
whoever wrote them, each with whatever is left of its blob (a dead learner's last versions).
The best confirmed version is pinned apart (`eval:best*`) and is never trimmed here.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import redis

from canopy.cache import blob, codecs, ledger
from canopy.keys import Keys
from canopy.lease import Fenced, Lease, fenced_script
from canopy.version import Version

# KEYS: lease, latest, ledger entry, ledger index; ARGV: token, version, notify channel, index
# score, then ledger pairs.
FENCED_PUBLISH = fenced_script("""
redis.call('HSET', KEYS[3], unpack(ARGV, 5))
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[2])
redis.call('SET', KEYS[2], ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[2])
return 1
""")


class Publisher:
    """Example:
    pub = Publisher(r, keys, learner_id=0, keep=8, lease=lease, keep_ledger=1024)
    version = pub.publish(net.export(), step=100, arch="mlp", checkpoint="7.100")
    """

    def __init__(
        self,
        r: redis.Redis,
        keys: Keys,
        learner_id: int,
        keep: int,
        lease: Lease | None = None,
        encoder: codecs.Encoder | None = None,
        keep_ledger: int = 1024,
    ):
        self.r, self.keys, self.learner_id, self.keep, self.lease = r, keys, learner_id, keep, lease
        self.encoder = encoder
        if encoder is not None and encoder.codec == "int8delta":
            # A delta is useless without its keyframe: keep versions back to the newest one.
            self.keep = max(keep, encoder.keyframe_every + 1)
        self.keep_ledger = max(keep_ledger, self.keep)  # a kept blob keeps its entry
        self.epoch = lease.epoch if lease is not None else int(r.incr(keys.epoch))
        self.published: deque[blob.Manifest] = deque()
        self._fenced = r.register_script(FENCED_PUBLISH)

    def publish(self, state: dict[str, np.ndarray], step: int, arch: str, checkpoint: str = "") -> Version:
        """Write a version and make it the latest; raises Fenced if the lease is no longer ours."""
        version = Version(self.epoch, step)
        manifest, chunks = blob.pack(state, version, arch, self.learner_id, encoder=self.encoder)
        # Room for this version's entry first, so the ledger never holds more than keep_ledger.
        old, bad = ledger.stale(self.r, self.keys, self.keep_ledger - 1)
        blob.discard(self.r, self.keys, old)  # before its entry: a crash between leaves it listed
        ledger.remove(self.r, self.keys, old, bad)
        if self.lease is None:
            blob.write(self.r, self.keys, manifest, chunks)
        else:
            self._publish_fenced(manifest, chunks, checkpoint)
        self.published.append(manifest)
        while len(self.published) > self.keep:
            blob.delete(self.r, self.keys, self.published.popleft())
        return version

    def _publish_fenced(self, manifest: blob.Manifest, chunks: list[bytes], checkpoint: str) -> None:
        assert self.lease is not None
        v = manifest.version
        pipe = self.r.pipeline(transaction=False)
        for i, chunk in enumerate(chunks):
            pipe.set(self.keys.model_chunk(v, i), chunk)
        pipe.hset(self.keys.model_manifest(v), mapping=manifest.to_fields())
        pipe.execute()  # invisible until `model:latest` moves, so safe to write unfenced
        args = [self.lease.token, str(v), self.keys.model_notify, v.packed()]
        for k, val in ledger.entry(manifest, checkpoint).items():
            args += [k, val]
        keys = [self.keys.lease, self.keys.model_latest, self.keys.ledger_version(v), self.keys.ledger_index]
        ok = self._fenced(keys=keys, args=args)
        if not ok:
            blob.delete(self.r, self.keys, manifest)
            self.lease.lost.set()
            raise Fenced(
                f"learner {self.learner_id} epoch {self.epoch} lost its lease: version {v} not published"
            )
