"""cluster/status.py: rows, rates and lag, and against a real redis-server the caption lines."""

from __future__ import annotations

import json

import redis

from canopy.cluster.status import add_lag, checkpoint_age, policy_lag, row
from canopy.keys import Keys


def test_policy_lag_summarises_actors_of_the_newest_epoch_and_counts_older_epochs_apart(
    redis_client: redis.Redis, run_keys: Keys
) -> None:
    redis_client.set(run_keys.model_latest, "2.500")
    for ident, version in enumerate(["2.400", "2.500", "1.900"]):
        redis_client.set(run_keys.ledger_actor(ident), version)
    redis_client.zadd(run_keys.alive("actor"), {"0": 1e12, "1": 1e12, "2": 1e12, "3": 1e12})  # 3: no entry
    text = policy_lag(redis_client, run_keys)
    assert "behind 2.500 over 3 actors" in text
    assert "min 0" in text and "max 100" in text
    assert "1 on an older epoch" in text


def test_policy_lag_says_so_when_nothing_was_published(redis_client: redis.Redis, run_keys: Keys) -> None:
    assert "no version published" in policy_lag(redis_client, run_keys)


def test_a_row_shows_the_mean_rate_of_its_role_counter_since_start() -> None:
    stats = {
        b"started_at": b"100.0",
        b"updated_at": b"110.0",
        b"env_steps_total": b"5000",
        b"state": b"running",
    }
    assert row("actor", 0, stats, deadline=200.0, now=111.0)["rate"] == "500"
    assert "rate" not in row("actor", 0, {**stats, b"updated_at": b"nan"}, deadline=200.0, now=111.0)
    assert "rate" not in row("cache", 0, stats, deadline=200.0, now=111.0)


def test_actor_lag_is_in_learner_steps_within_the_newest_epoch_from_the_ledger() -> None:
    rows = [{"role": "actor", "id": i} for i in range(4)] + [{"role": "learner", "id": 0}]
    ledger = {b"0": b"2.450", b"1": b"1.900", b"2": b"garbage", b"\xff": b"2.1"}
    add_lag(rows, b"2.500", ledger)
    assert [r.get("lag") for r in rows] == ["50", "epoch", None, None, None]
    add_lag(rows, b"not a version", ledger)  # untouched, no error


def test_checkpoint_age_comes_from_the_newest_committed_manifest(
    redis_client: redis.Redis, run_keys: Keys
) -> None:
    assert "none committed yet" in checkpoint_age(redis_client, run_keys, now=1000.0)
    redis_client.zadd(run_keys.ckpt_index, {"1.100": 1, "1.200": 2})
    redis_client.hset(run_keys.ckpt_manifest("1.200"), "doc", json.dumps({"created_at": 990.0}))
    assert checkpoint_age(redis_client, run_keys, now=1000.0) == "checkpoint 1.200: 10.0s old, 2 committed"
    redis_client.hset(run_keys.ckpt_manifest("1.200"), "doc", b"\xff not json")
    assert "no creation time" in checkpoint_age(redis_client, run_keys, now=1000.0)
