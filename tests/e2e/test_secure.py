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


def ask(endpoint: str, setup, op: str = "stats") -> dict | None:
    """The shard's answer to `op` on a socket `setup` prepared, or None."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        setup(sock)
        sock.connect(endpoint)
        sock.send_multipart(wire.encode({"op": op}))
        return wire.decode(sock.recv_multipart(), 1 << 20).header if sock.poll(1500) else None
    finally:
        sock.close(0)


def as_role(cfg: config_mod.Config, role: str):
    return lambda s: curve.as_client(s, curve.load(cfg.cluster, role), curve.REPLAY_SERVER)


@pytest.mark.slow
def test_a_run_with_curve_keys_trains_refuses_peers_without_a_key_and_ops_of_other_roles(
    canopy_up,  # noqa: F811
    tmp_path,
) -> None:
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
        assert ask(endpoint, lambda s: None) is None, "a plain socket got an answer"
        _, secret = zmq.auth.create_certificates(tmp_path, "stranger")
        public, private = zmq.auth.load_certificate(secret)

        def stranger(s: zmq.Socket) -> None:
            s.curve_secretkey, s.curve_publickey = private, public
            s.curve_serverkey = curve.load(cfg.cluster, "actor").server_public[curve.REPLAY_SERVER]

        assert ask(endpoint, stranger) is None, "an unauthorized key got an answer"
        # The actors' own keys: admitted, but not to the operator's ops.
        refused = ask(endpoint, as_role(cfg, "actor"), "configure")
        assert refused is not None and refused.get("code") == "forbidden", refused
        counted = ask(endpoint, as_role(cfg, "operator"))
        assert counted is not None and counted["forbidden_total"] >= 1, counted
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
