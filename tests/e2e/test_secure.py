"""`canopy up` with CURVE keys: every ZeroMQ socket is encrypted and authenticated, and
every role talks to Redis as its own least-privilege user."""

from __future__ import annotations

import signal

import pytest
import redis
import zmq
import zmq.auth
from conftest import wait_for
from test_up import EXIT_AFTER_SIGTERM_S, assert_all_gone, canopy_up  # noqa: F401 (fixture)

from canopy import config as config_mod
from canopy import curve, wire
from canopy.keys import Keys
from canopy.redisconn import connect


def ask_stats(endpoint: str, setup) -> bool:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        setup(sock)
        sock.connect(endpoint)
        sock.send_multipart(wire.encode({"op": "stats"}))
        return bool(sock.poll(1500))
    finally:
        sock.close(0)


@pytest.mark.slow
def test_a_run_with_curve_keys_trains_and_refuses_peers_without_a_key(canopy_up, tmp_path) -> None:  # noqa: F811
    keys_dir = tmp_path / "keys"
    curve.generate(keys_dir)
    run = canopy_up(
        f"--env CartPole-v1 --stop-at-return 100000 --time-limit 120 --set cluster.curve_dir='\"{keys_dir}\"'"
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
    keys = Keys(cfg.run.name)
    r = connect(cfg.cluster, "status", 0)  # the read-only user: enough to watch
    try:
        wait_for(
            lambda: int(float(r.hget(keys.proc("learner", 0), "versions_published_total") or 0)) >= 2,
            60,
            interval=0.2,
            what="versions published over CURVE sockets",
        )
        endpoint = cfg.cluster.replay[0]
        assert not ask_stats(endpoint, lambda s: None), "a plain socket got an answer"
        _, secret = zmq.auth.create_certificates(tmp_path, "stranger")
        public, private = zmq.auth.load_certificate(secret)

        def stranger(s: zmq.Socket) -> None:
            s.curve_secretkey, s.curve_publickey = private, public
            s.curve_serverkey = curve.load(cfg.cluster).server_public

        assert not ask_stats(endpoint, stranger), "an unauthorized key got an answer"
        wait_for(
            lambda: int(r.hget(keys.proc("replay", 0), "curve_refused_total") or 0) >= 1,
            15,
            interval=0.2,
            what="the replay shard counting the refused peer",
        )
        with pytest.raises(redis.exceptions.NoPermissionError):
            r.set(keys.model_latest, "1.1")
    finally:
        r.close()
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait(EXIT_AFTER_SIGTERM_S) == 0
    assert_all_gone(cluster)
