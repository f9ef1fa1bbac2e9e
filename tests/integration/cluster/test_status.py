"""cluster/status.py against a real redis-server: the policy-lag line of `canopy status`."""

from __future__ import annotations

import redis

from cluster.keys import Keys
from cluster.status import policy_lag


def test_policy_lag_summarises_actors_of_the_newest_epoch_and_counts_older_epochs_apart(
    redis_client: redis.Redis, run_keys: Keys
) -> None:
    redis_client.set(run_keys.model_latest, "2.500")
    redis_client.hset(run_keys.ledger_actors, mapping={"0": "2.400", "1": "2.500", "2": "1.900"})
    text = policy_lag(redis_client, run_keys)
    assert "behind 2.500 over 3 actors" in text
    assert "min 0" in text and "max 100" in text
    assert "1 on an older epoch" in text


def test_policy_lag_says_so_when_nothing_was_published(redis_client: redis.Redis, run_keys: Keys) -> None:
    assert "no version published" in policy_lag(redis_client, run_keys)
