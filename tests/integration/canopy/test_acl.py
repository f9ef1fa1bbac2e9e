"""canopy/acl.py on a real redis-server: each role can do its job and nothing more.

The role code paths run for real (Telemetry heartbeats, Publisher, CheckpointStore, the
lease); the refusals are Redis's own NOPERM errors.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from conftest import free_port, stop_process, wait_for

from canopy import acl
from canopy.keys import Keys
from canopy.learner.publisher import Publisher
from canopy.lease import Lease
from canopy.telemetry import Telemetry

RUN = "acl"
KEYS = Keys(RUN)
ACTORS = (3, 4)  # per-actor users (cluster.actor_users) beside the shared role users


@pytest.fixture(scope="module")
def users(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, redis.Redis]]:
    """A redis-server whose only users are the roles' (default user off); a client per role."""
    workdir: Path = tmp_path_factory.mktemp("acl")
    port = free_port()
    conf = workdir / "redis.conf"
    lines = [f"port {port}", "bind 127.0.0.1", 'save ""', "appendonly no", "user default off"]
    lines += [acl.user_line(r, RUN, f"pw-{r}") for r in acl.ROLES]
    lines += [acl.actor_user_line(i, RUN, f"pw-{acl.actor_user(i)}") for i in ACTORS]
    conf.write_text("\n".join(lines) + "\n")
    proc = subprocess.Popen(
        [shutil.which("redis-server") or "/usr/bin/redis-server", str(conf)], stdout=subprocess.DEVNULL
    )
    users = [*acl.ROLES, *(acl.actor_user(i) for i in ACTORS)]
    clients = {
        u: redis.Redis(port=port, username=u, password=f"pw-{u}", client_name=f"canopy:{u}:0") for u in users
    }

    def up() -> bool:
        try:
            return bool(clients["status"].ping())
        except redis.ConnectionError:
            return False

    try:
        wait_for(up, 10, what="redis-server with role users")
        yield clients
    finally:
        for c in clients.values():
            c.close()
        stop_process(proc)


WEIGHTS = {"w": np.arange(16, dtype=np.float32)}


def test_the_learner_publishes_takes_the_lease_and_writes_checkpoint_keys(users) -> None:
    r = users["learner"]
    lease = Lease(r, KEYS, learner=0, ttl_s=30)
    assert lease.try_acquire()
    version = Publisher(r, KEYS, 0, keep=2, lease=lease).publish(WEIGHTS, step=1, arch="mlp")
    assert r.get(KEYS.model_latest) == str(version).encode()
    r.set(KEYS.ckpt_chunk("1.1", 0), b"x")
    r.publish(KEYS.model_notify, str(version))


@pytest.mark.parametrize("role", ["actor", "evaluator", "cache", "replay"])
def test_every_role_keeps_its_own_telemetry(users, role: str) -> None:
    tel = Telemetry(users[role], KEYS, role, 7, period_s=1.0, commands=("pause",))
    users["learner"].rpush(KEYS.control(role, 7), "pause")
    tel.flush()
    tel.event("start")
    assert users["status"].hget(KEYS.proc(role, 7), "pid") is not None
    assert tel.commands.get(timeout=1) == "pause"
    assert users["status"].xlen(KEYS.events) > 0


@pytest.mark.parametrize("role", ["actor", "evaluator", "cache", "replay", "status"])
def test_no_role_but_the_learner_can_publish_checkpoint_or_take_the_lease(users, role: str) -> None:
    r = users[role]
    with pytest.raises(redis.exceptions.NoPermissionError):
        Publisher(r, KEYS, 0, keep=2).publish(WEIGHTS, step=99, arch="mlp")
    with pytest.raises(redis.exceptions.NoPermissionError):
        r.set(KEYS.ckpt_chunk("9.9", 0), b"forged")
    with pytest.raises(redis.exceptions.NoPermissionError):
        r.incr(KEYS.epoch)
    with pytest.raises(redis.exceptions.NoPermissionError):
        r.flushall()


def test_an_actor_cannot_rewrite_another_roles_stats_or_another_runs_keys(users) -> None:
    r = users["actor"]
    with pytest.raises(redis.exceptions.NoPermissionError):
        r.hset(KEYS.proc("learner", 0), "updates_total", 0)
    with pytest.raises(redis.exceptions.NoPermissionError):
        r.get(Keys("other-run").model_latest)
    with pytest.raises(redis.exceptions.NoPermissionError):
        r.delete(KEYS.events)  # write-only access to the stream appends, it does not delete


def test_actors_and_caches_read_the_model_and_the_status_reader_reads_everything(users) -> None:
    Publisher(users["learner"], KEYS, 0, keep=2).publish(WEIGHTS, step=2, arch="mlp")
    latest = users["learner"].get(KEYS.model_latest)
    for role in ("actor", "evaluator", "cache", "status"):
        assert users[role].get(KEYS.model_latest) == latest
    assert users["status"].hgetall(KEYS.proc("learner", 0)) is not None
    with pytest.raises(redis.exceptions.NoPermissionError):
        users["status"].hset(KEYS.proc("status", 0), "x", 1)


def test_an_actor_user_keeps_its_own_telemetry_and_ledger_entry_and_reads_the_model(users) -> None:
    r = users["actor-3"]
    tel = Telemetry(r, KEYS, "actor", 3, period_s=1.0, commands=("pause",))
    users["learner"].rpush(KEYS.control("actor", 3), "pause")
    tel.flush()
    tel.event("start")
    assert tel.commands.get(timeout=1) == "pause"
    assert users["status"].zscore(KEYS.alive("actor"), "3") is not None
    r.set(KEYS.ledger_actor(3), "1.7")
    assert users["status"].get(KEYS.ledger_actor(3)) == b"1.7"
    Publisher(users["learner"], KEYS, 0, keep=2).publish(WEIGHTS, step=3, arch="mlp")
    assert r.get(KEYS.model_latest) == users["learner"].get(KEYS.model_latest)
    assert r.zrange(KEYS.replay_members, 0, -1) == []


def test_actor_3_cannot_write_actor_4s_stats_ledger_entry_or_control_list(users) -> None:
    r = users["actor-3"]
    users["actor-4"].hset(KEYS.proc("actor", 4), "steps_total", 10)
    users["actor-4"].set(KEYS.ledger_actor(4), "1.7")
    forgeries = [
        lambda: r.hset(KEYS.proc("actor", 4), "steps_total", 0),
        lambda: r.delete(KEYS.proc("actor", 4)),
        lambda: r.set(KEYS.ledger_actor(4), "0.1"),
        lambda: r.rpush(KEYS.control("actor", 4), "pause"),
        lambda: r.hset(KEYS.proc("actor", 30), "steps_total", 0),  # its prefix, another id
        lambda: r.set(KEYS.ledger_version("1.7"), "x"),
        lambda: r.set(KEYS.model_latest, "9.9"),
    ]
    for forge in forgeries:
        with pytest.raises(redis.exceptions.NoPermissionError):
            forge()
    assert users["status"].hget(KEYS.proc("actor", 4), "steps_total") == b"10"
    assert users["status"].get(KEYS.ledger_actor(4)) == b"1.7"


def test_unknown_roles_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="known roles are"):
        acl.rules("trainer", RUN)
