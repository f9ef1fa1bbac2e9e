"""canopy/curve.py with real sockets: the key layout per role, and a server's ZAP handler
admitting the roles a socket allows, naming each message's role and refusing the rest."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
import zmq.auth
from conftest import wait_for

from canopy import curve
from canopy.config import ClusterConfig
from canopy.errors import UserError

REPLY_MS = 3000
DOMAIN = "test"


@pytest.fixture
def keys_dir(tmp_path: Path) -> Path:
    return curve.generate(tmp_path / "keys")


@pytest.fixture
def server(keys_dir: Path) -> Iterator[tuple[zmq.Socket, str, curve.Gate]]:
    """A ROUTER of a `replay` process, in its own context, that admits actors and learners."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    curve.use(curve.load_dir(keys_dir, "replay"))
    try:
        gate = curve.bind(sock, "tcp://127.0.0.1:0", DOMAIN, frozenset({curve.ACTOR, curve.LEARNER}))
        assert gate is not None
        yield sock, sock.getsockopt_string(zmq.LAST_ENDPOINT), gate
    finally:
        curve.use(None)
        sock.close(0)
        curve.close_gate(ctx)
        ctx.term()


def client(endpoint: str, keys: curve.Keys) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDTIMEO, 500)  # a refused handshake may leave no pipe to send on
    curve.as_client(sock, keys, curve.REPLAY_SERVER)
    sock.connect(endpoint)
    return sock


def role_of_next(sock: zmq.Socket, gate: curve.Gate, timeout_ms: int) -> str | bool | None:
    """The role the server reads off the next message (False: none came)."""
    if not sock.poll(timeout_ms):
        return False
    ident, body = sock.recv_multipart(copy=False)
    sock.send_multipart([ident, body])
    return gate.role_of(body)


def stranger(tmp_path: Path) -> tuple[bytes, bytes]:
    _, secret = zmq.auth.create_certificates(tmp_path, "stranger")
    public, private = zmq.auth.load_certificate(secret)
    assert private is not None
    return public, private


def test_keys_make_a_folder_per_role_with_private_secrets(keys_dir: Path) -> None:
    for role in curve.CLIENT_ROLES:
        assert (keys_dir / role / f"{role}.key_secret").stat().st_mode & 0o777 == 0o600
        assert (keys_dir / role).stat().st_mode & 0o777 == 0o700
        assert (keys_dir / "authorized" / role / f"{role}.key").read_bytes() == (
            keys_dir / role / f"{role}.key"
        ).read_bytes()
    for name in curve.SERVERS:
        assert (keys_dir / "server" / f"{name}.key_secret").stat().st_mode & 0o777 == 0o600
    allowed = curve.read_allowed(keys_dir)
    assert sorted(allowed.values()) == sorted(curve.CLIENT_ROLES)  # five distinct keypairs
    with pytest.raises(UserError, match="already holds keys"):
        curve.generate(keys_dir)
    assert curve.complete(keys_dir) == []  # the deploy step keeps what exists


@pytest.mark.parametrize("role", sorted(curve.PROCESS_IDENTITIES))
def test_each_role_runs_on_its_own_mounts_and_holds_no_other_secret(
    keys_dir: Path, tmp_path: Path, role: str
) -> None:
    mounted = tmp_path / "mounted"
    for rel in curve.mounts(role):
        src, dst = keys_dir / rel, mounted / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if rel.endswith("/") else shutil.copy)(src, dst)
    keys = curve.load(ClusterConfig(curve_dir=str(mounted)), role)
    assert keys is not None
    client_role, server = curve.PROCESS_IDENTITIES[role]
    assert (keys.client is not None) == (client_role is not None)
    assert (keys.server is not None) == (server is not None)
    assert set(keys.server_public) == set(curve.SERVERS)
    secrets = {p.relative_to(mounted).as_posix() for p in mounted.rglob("*_secret")}
    own = {f"{client_role}/{client_role}.key_secret"} if client_role else set()
    assert secrets == own | ({f"server/{server}.key_secret"} if server else set())


def test_a_role_without_a_server_key_cannot_serve(keys_dir: Path) -> None:
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    curve.use(curve.load_dir(keys_dir, "actor"))
    try:
        with pytest.raises(UserError, match="no server key"):
            curve.bind(sock, "tcp://127.0.0.1:0", DOMAIN, frozenset({curve.ACTOR}))
    finally:
        curve.use(None)
        sock.close(0)


def test_missing_or_old_layout_keys_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="canopy keys"):
        curve.load(ClusterConfig(curve_dir=str(tmp_path / "none")), "actor")
    assert curve.load(ClusterConfig(), "actor") is None
    old = tmp_path / "old"
    old.mkdir()
    zmq.auth.create_certificates(old, "server")
    with pytest.raises(UserError, match="old one-keypair layout"):
        curve.load(ClusterConfig(curve_dir=str(old)), "actor")


def test_each_message_carries_its_clients_role(server, keys_dir: Path) -> None:
    sock, endpoint, gate = server
    for role in (curve.ACTOR, curve.LEARNER):
        c = client(endpoint, curve.load_dir(keys_dir, role))
        try:
            c.send(b"ping")
            assert role_of_next(sock, gate, REPLY_MS) == role
            assert c.poll(REPLY_MS) and c.recv() == b"ping"
        finally:
            c.close(0)
    assert gate.refused_total == 0


@pytest.mark.parametrize("who", ["operator", "stranger", "plain"])
def test_a_client_whose_role_the_socket_does_not_admit_never_reaches_it(
    server, keys_dir: Path, tmp_path: Path, who: str
) -> None:
    sock, endpoint, gate = server
    c = zmq.Context.instance().socket(zmq.DEALER)
    c.setsockopt(zmq.LINGER, 0)
    c.setsockopt(zmq.SNDTIMEO, 500)
    if who == "stranger":
        c.curve_publickey, c.curve_secretkey = stranger(tmp_path)
        c.curve_serverkey = curve.load_dir(keys_dir, "actor").server_public[curve.REPLAY_SERVER]
    elif who == "operator":  # a real key, of a role this socket does not admit
        curve.as_client(c, curve.load_dir(keys_dir, who), curve.REPLAY_SERVER)
    c.connect(endpoint)
    try:
        with contextlib.suppress(zmq.Again):
            c.send(b"ping")
        if who != "plain":  # a plain peer fails the CURVE handshake before ZAP is asked
            wait_for(lambda: gate.refused_total >= 1, 5, what="the ZAP handler refusing the key")
            assert curve.refused_total() >= 1
        assert role_of_next(sock, gate, 300) is False
    finally:
        c.close(0)


def test_a_key_removed_from_the_allow_list_is_refused_on_open_and_new_connections(
    server, keys_dir: Path
) -> None:
    sock, endpoint, gate = server
    learner = curve.load_dir(keys_dir, "learner")
    c = client(endpoint, learner)
    try:
        c.send(b"before")
        assert role_of_next(sock, gate, REPLY_MS) == curve.LEARNER
        (keys_dir / "authorized" / "learner" / "learner.key").unlink()
        # The open connection stays up, but its messages no longer name a role.
        wait_for(lambda: curve.LEARNER not in gate.allowed().values(), 2 * curve.RELOAD_S + 1)
        c.send(b"after")
        assert role_of_next(sock, gate, REPLY_MS) is None
        late = client(endpoint, learner)
        try:
            with contextlib.suppress(zmq.Again):
                late.send(b"new")
            wait_for(lambda: gate.refused_total >= 1, 5, what="the revoked key refused at the handshake")
            assert role_of_next(sock, gate, 300) is False
        finally:
            late.close(0)
    finally:
        c.close(0)


def test_a_key_authorized_under_two_roles_is_refused_as_both(keys_dir: Path) -> None:
    shutil.copy(keys_dir / "actor" / "actor.key", keys_dir / "authorized" / "learner" / "actor.key")
    allowed = curve.read_allowed(keys_dir)
    actor_public = curve.load_dir(keys_dir, "actor").client
    assert actor_public is not None and actor_public[0] not in allowed
    assert curve.LEARNER in allowed.values()


def test_canopy_keys_makes_the_layout_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from canopy.cluster import cli

    d = tmp_path / "keys"
    assert cli.main(["keys", str(d)]) == 0
    assert curve.load_dir(d, "cache").server is not None
    assert sorted(curve.read_allowed(d).values()) == sorted(curve.CLIENT_ROLES)
    capsys.readouterr()
    assert cli.main(["keys", str(d)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds keys" in err


def test_rotating_a_roles_key_authorizes_the_new_one_and_keeps_revocations(keys_dir: Path) -> None:
    old_actor = curve.load_dir(keys_dir, "actor").client
    shutil.rmtree(keys_dir / "actor")
    (keys_dir / "authorized" / "actor" / "actor.key").unlink()
    (keys_dir / "authorized" / "evaluator" / "evaluator.key").unlink()  # revoked, not rotated
    made = curve.complete(keys_dir)
    assert {p.relative_to(keys_dir).as_posix() for p in made} == {
        "actor/actor.key",
        "actor/actor.key_secret",
        "authorized/actor/actor.key",
    }
    new_actor = curve.load_dir(keys_dir, "actor").client
    allowed = curve.read_allowed(keys_dir)
    assert old_actor is not None and new_actor is not None
    assert old_actor[0] not in allowed and allowed[new_actor[0]] == curve.ACTOR
    assert curve.EVALUATOR not in allowed.values()
