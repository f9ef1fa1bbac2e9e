"""canopy/curve.py with real sockets: authorized peers talk, everyone else is refused and counted."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import zmq
import zmq.auth
from conftest import wait_for

from canopy import curve
from canopy.config import ClusterConfig
from canopy.errors import UserError

REPLY_MS = 3000


@pytest.fixture
def keys(tmp_path: Path) -> curve.Keys:
    curve.generate(tmp_path / "keys")
    loaded = curve.load(ClusterConfig(curve_dir=str(tmp_path / "keys")))
    assert loaded is not None
    return loaded


@pytest.fixture
def server(keys: curve.Keys):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    curve.use(keys)
    try:
        curve.bind(sock, "tcp://127.0.0.1:0")
        yield sock, sock.getsockopt_string(zmq.LAST_ENDPOINT), curve.gate(ctx, keys)
    finally:
        curve.use(None)
        sock.close(0)
        curve.close_gate(ctx)
        ctx.term()


def echo_once(sock: zmq.Socket, timeout_ms: int) -> bool:
    if not sock.poll(timeout_ms):
        return False
    ident, body = sock.recv_multipart()
    sock.send_multipart([ident, body])
    return True


def test_an_authorized_client_is_served_over_curve(server, keys: curve.Keys) -> None:
    sock, endpoint, gate = server
    client = zmq.Context.instance().socket(zmq.DEALER)
    client.setsockopt(zmq.LINGER, 0)
    try:
        curve.connect(client, endpoint)
        client.send(b"ping")
        assert echo_once(sock, REPLY_MS)
        assert client.poll(REPLY_MS) and client.recv() == b"ping"
        assert gate.refused_total == 0
    finally:
        client.close(0)


def test_a_client_with_an_unknown_key_is_refused_and_counted(
    server, keys: curve.Keys, tmp_path: Path
) -> None:
    sock, endpoint, gate = server
    _, secret = zmq.auth.create_certificates(tmp_path, "intruder")
    intruder_public, intruder_secret = zmq.auth.load_certificate(secret)
    client = zmq.Context.instance().socket(zmq.DEALER)
    client.setsockopt(zmq.LINGER, 0)
    try:
        client.curve_secretkey, client.curve_publickey = intruder_secret, intruder_public
        client.curve_serverkey = keys.server_public
        client.connect(endpoint)
        client.send(b"ping")
        wait_for(lambda: gate.refused_total >= 1, 5, what="the ZAP handler refusing the key")
        assert curve.refused_total() >= 1
        assert not echo_once(sock, 300)
    finally:
        client.close(0)


def test_a_plain_client_never_reaches_a_curve_server(server) -> None:
    sock, endpoint, _ = server
    client = zmq.Context.instance().socket(zmq.DEALER)
    client.setsockopt(zmq.LINGER, 0)
    try:
        client.connect(endpoint)
        # The refused handshake may tear the pipe down before the send: a DEALER with no
        # pipe then blocks on send, which here is the same as never reaching the server.
        client.setsockopt(zmq.SNDTIMEO, 500)
        with contextlib.suppress(zmq.Again):
            client.send(b"ping")
        assert not echo_once(sock, 500)
    finally:
        client.close(0)


def test_keys_are_generated_once_with_private_secret_files(tmp_path: Path) -> None:
    d = curve.generate(tmp_path / "k")
    assert (d / "server.key_secret").stat().st_mode & 0o777 == 0o600
    with pytest.raises(UserError, match="already holds keys"):
        curve.generate(d)


def test_a_missing_key_directory_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="canopy keys"):
        curve.load(ClusterConfig(curve_dir=str(tmp_path / "none")))
    assert curve.load(ClusterConfig()) is None


def test_a_replay_shard_with_keys_serves_keyed_clients_and_refuses_the_rest(
    keys: curve.Keys, tmp_path: Path
) -> None:
    import threading

    import numpy as np

    from canopy.config import ReplayConfig
    from canopy.replay.client import InsertClient, request_stats
    from canopy.replay.server import ReplayServer

    curve.use(keys)
    server = ReplayServer(ReplayConfig(min_size=1, samples_per_insert=0.0, capacity=100))
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, args=(stop,), daemon=True)
    try:
        endpoint = server.bind("tcp://127.0.0.1:0")
        thread.start()
        client = InsertClient(endpoint, inflight=1)
        client.insert({"x": np.zeros((4, 2), np.float32)}, timeout=5)
        client.flush(timeout=5)
        assert request_stats(endpoint, timeout=5)["items"] == 4  # both sides keyed: served
        client.close()

        _, secret = zmq.auth.create_certificates(tmp_path, "stranger")
        stranger_public, stranger_secret = zmq.auth.load_certificate(secret)
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.curve_secretkey, sock.curve_publickey = stranger_secret, stranger_public
        sock.curve_serverkey = keys.server_public
        sock.connect(endpoint)
        sock.send(b"anything")
        wait_for(lambda: curve.refused_total() >= 1, 5, what="the shard refusing an unknown key")
        sock.close(0)
    finally:
        stop.set()
        thread.join(timeout=5)
        curve.use(None)
        curve.close_gate(zmq.Context.instance())  # the shared context serves later tests in clear
