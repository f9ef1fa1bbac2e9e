"""A cache node with CURVE keys, in its own process, called from here under each role's keys:
its children's roles (cache/protocol.py ROLES) fetch and hear new versions, every other
peer reaches neither socket, a revoked key is refused, and the node counts it all."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import zmq
import zmq.auth
from conftest import RedisServer, mlp_weights, stop_process, wait_for

from canopy import curve, wire
from canopy.cache import protocol
from canopy.keys import Keys
from canopy.learner.network import ARCH
from canopy.learner.publisher import Publisher

WORKER = Path(__file__).parents[2] / "fuzz" / "fuzz_worker.py"
REPLY_MS = 5000
REFUSED_MS = 1000  # how long a refused peer waits for the answer it must never get


@dataclass
class Node:
    proc: subprocess.Popen
    fetch: str
    notify: str
    keys_dir: Path
    publisher: Publisher

    def counters(self) -> dict[str, Any]:
        """Stop the node; the counters it printed as it stopped."""
        stop_process(self.proc)
        tag, _, counters = self.proc.stdout.read().partition(" ")
        assert tag == "counters", tag
        return json.loads(counters)


@pytest.fixture
def node(
    redis_server: RedisServer, redis_client: redis.Redis, run_keys: Keys, tmp_path: Path
) -> Iterator[Node]:
    keys_dir = curve.generate(tmp_path / "keys")
    publisher = Publisher(redis_client, run_keys, learner_id=0, keep=2)
    publisher.publish(mlp_weights(0), step=1, arch=ARCH)
    cmd = [
        *(sys.executable, str(WORKER), "cache", str(redis_server.port), redis_server.user),
        *(str(redis_server.password_file), run_keys.run, str(keys_dir)),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().split()
        assert line[:1] == ["ready"], f"cache worker did not start (exit {proc.poll()})"
        n = Node(proc, line[1], line[2], keys_dir, publisher)
        wait_for(
            lambda: (latest(n, curve.ACTOR) or {}).get("op") == protocol.VERSION,
            10,
            interval=0.1,
            what="the node's first version",
        )
        yield n
    finally:
        stop_process(proc)


def keyed(sock: zmq.Socket, keys_dir: Path, role: str | None) -> zmq.Socket:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDTIMEO, 500)  # a refused handshake may leave no pipe to send on
    if role is not None:
        curve.as_client(sock, curve.load_dir(keys_dir, role), curve.CACHE_SERVER)
    return sock


def latest(node: Node, role: str | None, keys_dir: Path | None = None, timeout_ms: int = REPLY_MS) -> Any:
    """The first reply to `latest` on a fresh DEALER under `role`'s keys (None: none came)."""
    sock = keyed(zmq.Context.instance().socket(zmq.DEALER), keys_dir or node.keys_dir, role)
    try:
        sock.connect(node.fetch)
        sock.send_multipart(wire.encode({"op": protocol.LATEST}))
        return wire.decode(sock.recv_multipart(), 1 << 26).header if sock.poll(timeout_ms) else None
    except zmq.Again:
        return None
    finally:
        sock.close(0)


def stranger_keys(node: Node, tmp_path: Path) -> Path:
    """A key directory like the cluster's, but with an actor keypair no allow-list holds."""
    d = tmp_path / "stranger"
    (d / curve.ACTOR).mkdir(parents=True)
    zmq.auth.create_certificates(d / curve.ACTOR, curve.ACTOR)
    shutil.copytree(node.keys_dir / "server", d / "server")
    return d


def test_children_fetch_and_hear_new_versions_and_nobody_else_reaches_the_node(
    node: Node, tmp_path: Path
) -> None:
    for role in (curve.ACTOR, curve.EVALUATOR, curve.CACHE):
        reply = latest(node, role)
        assert reply is not None and reply["op"] == protocol.VERSION, f"{role}: {reply}"
    for role in (curve.LEARNER, curve.OPERATOR, None):
        assert latest(node, role, timeout_ms=REFUSED_MS) is None, f"{role or 'a plain peer'} was answered"
    assert latest(node, curve.ACTOR, stranger_keys(node, tmp_path), REFUSED_MS) is None

    ctx = zmq.Context.instance()
    subs = {role: keyed(ctx.socket(zmq.SUB), node.keys_dir, role) for role in (curve.ACTOR, curve.LEARNER)}
    try:
        for sub in subs.values():
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            sub.connect(node.notify)
        # PUB drops what is sent before a subscriber is joined: publish until the actor hears one.
        step = [1]

        def heard() -> bool:
            step[0] += 1
            node.publisher.publish(mlp_weights(step[0]), step=step[0], arch=ARCH)
            return bool(subs[curve.ACTOR].poll(500))

        wait_for(heard, 20, interval=0.1, what="the actor's SUB hearing a new version")
        assert not subs[curve.LEARNER].poll(REFUSED_MS), "a learner's SUB heard the node"
    finally:
        for sub in subs.values():
            sub.close(0)

    assert node.proc.poll() is None
    counters = node.counters()
    # Refused at the handshake: learner, operator, stranger on fetch; learner on notify.
    assert counters["curve_refused_total"] >= 4 and counters["forbidden_total"] == 0


def test_a_revoked_actor_key_is_refused_on_its_open_connection(node: Node) -> None:
    sock = keyed(zmq.Context.instance().socket(zmq.DEALER), node.keys_dir, curve.ACTOR)
    try:
        sock.connect(node.fetch)
        sock.send_multipart(wire.encode({"op": protocol.HELLO}))
        assert sock.poll(REPLY_MS) and wire.decode(sock.recv_multipart(), 1 << 20).op == protocol.HELLO
        (node.keys_dir / "authorized" / "actor" / "actor.key").unlink()

        def refused() -> bool:
            sock.send_multipart(wire.encode({"op": protocol.HELLO}))
            assert sock.poll(REPLY_MS)
            reply = wire.decode(sock.recv_multipart(), 1 << 20).header
            return reply["op"] == protocol.ERROR and reply["code"] == protocol.FORBIDDEN

        wait_for(refused, 3 * curve.RELOAD_S + 5, interval=0.2, what="the revoked key refused")
    finally:
        sock.close(0)
    assert latest(node, curve.ACTOR, timeout_ms=REFUSED_MS) is None  # nor may it connect again
    assert latest(node, curve.EVALUATOR) is not None  # the others are still served
    counters = node.counters()
    assert counters["forbidden_total"] >= 1 and counters["curve_refused_total"] >= 1
