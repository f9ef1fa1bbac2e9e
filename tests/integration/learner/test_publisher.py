"""learner/publisher.py under a lease, against a real Redis: the fenced publish and its ledger entry."""

from __future__ import annotations

import numpy as np
import pytest
import redis

from canopy.cache import blob, ledger
from canopy.keys import Keys
from canopy.learner.publisher import Publisher
from canopy.lease import Fenced, Lease, parse_token, token
from canopy.version import Version

STATE = {"w": np.arange(8, dtype=np.float32)}


def test_the_lease_value_acquire_writes_is_the_token_the_module_builds(
    redis_client: redis.Redis, run_keys: Keys
) -> None:
    lease = Lease(redis_client, run_keys, learner=3, ttl_s=60.0)
    assert lease.try_acquire()
    assert lease.token == token(lease.epoch, 3)
    assert parse_token(redis_client.get(run_keys.lease)) == (lease.epoch, 3)


def test_a_fenced_publish_writes_the_ledger_entry_with_its_checkpoint(
    redis_client: redis.Redis, run_keys: Keys
) -> None:
    lease = Lease(redis_client, run_keys, learner=0, ttl_s=60.0)
    assert lease.try_acquire()
    version = Publisher(redis_client, run_keys, learner_id=0, keep=8, lease=lease).publish(
        STATE, step=5, arch="mlp", checkpoint=f"{lease.epoch}.4"
    )

    manifest = blob.read_manifest(redis_client, run_keys, version)
    raw = redis_client.hgetall(run_keys.ledger_version(version))
    stored = {k.decode(): v.decode() for k, v in raw.items()}
    assert stored == ledger.entry(manifest, f"{lease.epoch}.4")
    assert redis_client.get(run_keys.model_latest) == str(version).encode()


def test_a_publisher_whose_lease_was_taken_writes_nothing_visible(
    redis_client: redis.Redis, run_keys: Keys
) -> None:
    lease = Lease(redis_client, run_keys, learner=0, ttl_s=60.0)
    assert lease.try_acquire()
    publisher = Publisher(redis_client, run_keys, learner_id=0, keep=8, lease=lease)
    redis_client.set(run_keys.lease, token(lease.epoch + 1, 1))  # a successor took over

    with pytest.raises(Fenced):
        publisher.publish(STATE, step=5, arch="mlp")
    version = Version(lease.epoch, 5)
    assert not redis_client.exists(run_keys.ledger_version(version), run_keys.model_manifest(version))
    assert redis_client.get(run_keys.model_latest) is None
    assert lease.lost.is_set()
