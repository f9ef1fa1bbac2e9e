"""`canopy up` with `cluster.tls = true`: Redis answers TLS only, every role verifies it, and
CartPole trains and publishes; each actor writes its own Redis keys and no other's."""

from __future__ import annotations

import signal
import ssl

import pytest
import redis
from conftest import wait_for
from test_up import EXIT_AFTER_SIGTERM_S, assert_all_gone, canopy_up  # noqa: F401 (fixture)

from canopy import acl
from canopy import config as config_mod
from canopy.keys import Keys
from canopy.redisconn import connect, read_password, role_password_file

VERSIONS = 3  # several versions published and taken up by the actors over TLS


@pytest.mark.slow
def test_a_tls_run_trains_cartpole_and_refuses_plaintext_and_forged_actor_writes(canopy_up) -> None:  # noqa: F811
    # Few final-scoring episodes, so that the run's exit is mostly its roles stopping.
    run = canopy_up(
        "--env CartPole-v1 --stop-at-return 100000 --time-limit 180 --set cluster.tls=true "
        "--set eval.confirm_episodes=5"
    )
    wait_for(
        lambda: (run.run_dir / "cluster.json").exists() or run.proc.poll() is not None,
        120,
        interval=0.1,
        what="cluster.json",
    )
    assert run.proc.poll() is None, run.stderr_text()[-2000:]
    cluster = run.cluster()
    cfg = config_mod.load(cluster["config"])
    c, keys = cfg.cluster, Keys(cfg.run.name)
    assert c.tls and c.actor_users
    r = connect(c, "status", 0)
    actor0 = connect(c, "actor", 0)
    try:

        def published() -> int:
            return int(float(r.hget(keys.proc("learner", 0), "versions_published_total") or 0))

        wait_for(lambda: published() >= VERSIONS, 150, interval=0.5, what=f"{VERSIONS} versions over TLS")
        wait_for(lambda: r.get(keys.ledger_actor(0)), 60, interval=0.2, what="actor 0 acting with a version")
        assert isinstance(r.connection_pool.get_connection()._sock, ssl.SSLSocket)

        host, _, port = c.redis[0].rpartition(":")
        password = read_password(c, role_password_file(c, "status"))
        plain = redis.Redis(host=host, port=int(port), username="status", password=password, socket_timeout=5)
        with pytest.raises(redis.ConnectionError):
            plain.ping()
        plain.close()

        assert actor0.connection_pool.connection_kwargs["username"] == acl.actor_user(0)
        own = actor0.get(keys.ledger_actor(0))
        actor0.set(keys.ledger_actor(0), own)
        for forge in (
            lambda: actor0.set(keys.ledger_actor(1), "0.1"),
            lambda: actor0.hset(keys.proc("actor", 1), "env_steps_total", 0),
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                forge()
    finally:
        r.close()
        actor0.close()
    run.proc.send_signal(signal.SIGTERM)
    # Its exit took 18-28 s under a load average of 20-30 on 2 cores, plaintext 18 s: twice the bound.
    assert run.wait(2 * EXIT_AFTER_SIGTERM_S) == 0
    assert not (run.run_dir / "redis.actor.password").exists()  # no shared actor user to hold
    assert_all_gone(cluster)
