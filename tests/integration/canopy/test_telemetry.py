"""canopy/telemetry.py against a real redis-server: stats hash, liveness, control lists."""

from __future__ import annotations

import time

import redis
from conftest import wait_for

from canopy.keys import Keys
from canopy.telemetry import Telemetry

PERIOD_S = 0.1
TIMEOUT_S = 10.0


def events(r: redis.Redis, keys: Keys) -> list[dict[str, str]]:
    return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in r.xrange(keys.events)]


def test_a_process_is_listed_alive_with_its_counters_and_removed_when_it_closes(
    redis_client: redis.Redis, run_keys: Keys
) -> None:
    tel = Telemetry(redis_client, run_keys, "actor", 3, PERIOD_S)
    tel.counters["env_steps_total"] = 42
    tel.start()
    tel.set_state("running")
    stats = redis_client.hgetall(run_keys.proc("actor", 3))
    assert stats[b"env_steps_total"] == b"42" and stats[b"state"] == b"running"
    assert 10 << 20 < int(stats[b"rss_bytes"]) < 64 << 30  # this test process: tens of MB, not 0
    assert redis_client.ttl(run_keys.proc("actor", 3)) > 0
    assert redis_client.zscore(run_keys.alive("actor"), "3") > time.time()
    tel.close()
    assert redis_client.zscore(run_keys.alive("actor"), "3") is None
    assert redis_client.hget(run_keys.proc("actor", 3), "state") == b"stopped"


def test_an_operator_command_pushed_on_the_control_list_reaches_the_role(
    redis_client: redis.Redis, run_keys: Keys
) -> None:
    tel = Telemetry(redis_client, run_keys, "actor", 0, PERIOD_S, commands=("pause", "resume"))
    tel.start()
    try:
        redis_client.rpush(run_keys.control("actor", 0), "pause", "resume")
        got = [wait_for(lambda: not tel.commands.empty() and tel.commands.get(), TIMEOUT_S, what="pause")]
        got.append(
            wait_for(lambda: not tel.commands.empty() and tel.commands.get(), TIMEOUT_S, what="resume")
        )
        assert got == ["pause", "resume"]
        assert [e["command"] for e in events(redis_client, run_keys) if e["kind"] == "command"] == got
    finally:
        tel.close()


def test_an_unknown_command_is_counted_and_reported_never_passed_on(
    redis_client: redis.Redis, run_keys: Keys
) -> None:
    tel = Telemetry(redis_client, run_keys, "learner", 0, PERIOD_S, commands=("checkpoint",))
    tel.start()
    try:
        redis_client.rpush(run_keys.control("learner", 0), "rm -rf /" * 20)
        wait_for(lambda: tel.counters.get("rejected_commands_total") == 1, TIMEOUT_S, what="rejection")
        assert tel.commands.empty()
        rejected = [e for e in events(redis_client, run_keys) if e["kind"] == "rejected_input"]
        assert len(rejected) == 1 and len(rejected[0]["command"]) <= 64
    finally:
        tel.close()
