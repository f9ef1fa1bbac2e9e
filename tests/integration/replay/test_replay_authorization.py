"""A replay shard with CURVE keys, in its own process, called from here under each role's
keys: every op is authorized by role (replay/protocol.py ROLES), peers without an allowed
key never reach it, a revoked key is refused, and the shard keeps serving and counts it all."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
import zmq.auth
from conftest import stop_process, wait_for

from canopy import curve, wire
from canopy.replay import protocol
from canopy.replay.client import InsertClient, SampleClient

WORKER = Path(__file__).parents[2] / "fuzz" / "fuzz_worker.py"
REPLY_MS = 5000
REFUSED_MS = 1000  # how long a refused peer waits for the answer it must never get
ROLE_OPS = {
    protocol.Op.CONFIGURE: protocol.configure_request(min_size=1),
    protocol.Op.SNAPSHOT: protocol.snapshot_request(),
    protocol.Op.STATS: protocol.stats_request(),
    protocol.Op.SAMPLE: protocol.sample_request(1, 2),
    protocol.Op.INSERT: protocol.insert_request(1, 2),
    protocol.Op.PRIORITY: protocol.priority_request(1, 1, reply=True),
}


@dataclass
class Shard:
    proc: subprocess.Popen
    endpoint: str
    keys_dir: Path


@pytest.fixture
def shard(tmp_path: Path) -> Iterator[Shard]:
    keys_dir = curve.generate(tmp_path / "keys")
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), "replay", str(keys_dir)], stdout=subprocess.PIPE, text=True
    )
    try:
        line = proc.stdout.readline().split()
        assert line[:1] == ["ready"], f"replay worker did not start (exit {proc.poll()})"
        yield Shard(proc, line[1], keys_dir)
    finally:
        stop_process(proc)


def dealer(shard: Shard, role: str | None, keys_dir: Path | None = None) -> zmq.Socket:
    """A DEALER on the shard under `role`'s keys (None: plain, no CURVE) from `keys_dir`
    (default: the shard's)."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDTIMEO, 500)  # a refused handshake may leave no pipe to send on
    if role is not None:
        curve.as_client(sock, curve.load_dir(keys_dir or shard.keys_dir, role), curve.REPLAY_SERVER)
    sock.connect(shard.endpoint)
    return sock


def call(sock: zmq.Socket, op: str, timeout_ms: int = REPLY_MS) -> dict[str, Any] | None:
    header = ROLE_OPS[protocol.Op(op)]
    arrays = {}
    if op == protocol.Op.INSERT:
        arrays = {"x": np.zeros((2, 3), np.float32)}
    elif op == protocol.Op.PRIORITY:
        arrays = protocol.priority_arrays(np.zeros(1, np.int64), np.zeros(1, np.int64), np.ones(1))
    try:
        sock.send_multipart(wire.encode(header, arrays))
    except zmq.Again:
        return None
    if not sock.poll(timeout_ms):
        return None
    return wire.decode(sock.recv_multipart(), 1 << 26).header


def stats(shard: Shard) -> dict[str, Any]:
    sock = dealer(shard, curve.OPERATOR)
    try:
        reply = call(sock, protocol.Op.STATS)
    finally:
        sock.close(0)
    assert reply is not None and reply["op"] == "stats", reply
    return reply


def forbidden(reply: dict[str, Any] | None) -> bool:
    return reply is not None and reply["op"] == "error" and protocol.error_code(reply) == "forbidden"


def test_every_op_is_answered_or_refused_by_the_role_table(shard: Shard) -> None:
    refused = 0
    for role in (curve.ACTOR, curve.LEARNER, curve.OPERATOR):
        sock = dealer(shard, role)
        try:
            for op in protocol.Op:
                reply = call(sock, op)
                allowed = role in protocol.ROLES[op]
                assert forbidden(reply) != allowed, f"{op} under the {role}'s keys: {reply}"
                refused += not allowed
        finally:
            sock.close(0)
    # An actor may only insert; admin ops and the learner's are refused to it.
    assert protocol.ROLES[protocol.Op.INSERT] == {curve.ACTOR}
    assert all(curve.ACTOR not in protocol.ROLES[op] for op in protocol.Op if op != protocol.Op.INSERT)
    after = stats(shard)
    assert after["forbidden_total"] == refused and after["items"] == 2  # the actor's insert landed
    assert shard.proc.poll() is None


def test_a_learners_keys_sample_and_update_priorities_through_the_real_clients(shard: Shard) -> None:
    curve.use(curve.load_dir(shard.keys_dir, curve.ACTOR))
    try:
        inserter = InsertClient(shard.endpoint, inflight=1)
        inserter.insert({"x": np.arange(8, dtype=np.float32).reshape(8, 1)}, timeout=5)
        inserter.flush(timeout=5)
        inserter.close()
    finally:
        curve.use(None)
    curve.use(curve.load_dir(shard.keys_dir, curve.LEARNER))
    try:
        sampler = SampleClient([shard.endpoint], batch=4, inflight=1)
        batch = sampler.next(timeout=5)
        assert batch is not None and len(batch["slot"]) == 4
        sampler.update_priorities(0, batch["slot"], batch["gen"], np.full(4, 2.0))
        wait_for(lambda: stats(shard)["priority_updates_total"] >= 1, 5, what="the learner's priority update")
        sampler.close()
    finally:
        curve.use(None)
    assert stats(shard)["forbidden_total"] == 0


@pytest.mark.parametrize("who", ["plain", "stranger", curve.EVALUATOR, curve.CACHE])
def test_a_peer_without_a_key_the_shard_allows_gets_no_answer_and_is_counted(
    shard: Shard, tmp_path: Path, who: str
) -> None:
    if who == "stranger":  # a keypair of its own, never authorized, and the shard's public key
        (tmp_path / "stranger" / curve.ACTOR).mkdir(parents=True)
        zmq.auth.create_certificates(tmp_path / "stranger" / curve.ACTOR, curve.ACTOR)
        shutil.copytree(shard.keys_dir / "server", tmp_path / "stranger" / "server")
        sock = dealer(shard, curve.ACTOR, tmp_path / "stranger")
    else:
        sock = dealer(shard, None if who == "plain" else who)
    try:
        for op in (protocol.Op.STATS, protocol.Op.INSERT, protocol.Op.CONFIGURE):
            assert call(sock, op, REFUSED_MS) is None, f"{who} got an answer to {op}"
    finally:
        sock.close(0)
    after = stats(shard)  # still serving
    if who != "plain":  # a plain peer fails the CURVE handshake before the ZAP handler is asked
        assert after["curve_refused_total"] >= 1
    assert after["forbidden_total"] == 0 and after["items"] == 0


def test_a_revoked_learner_key_is_refused_on_its_open_connection_and_on_new_ones(shard: Shard) -> None:
    actor = dealer(shard, curve.ACTOR)
    try:
        assert call(actor, protocol.Op.INSERT)["op"] == "ack"
    finally:
        actor.close(0)
    sock = dealer(shard, curve.LEARNER)
    try:
        assert call(sock, protocol.Op.SAMPLE)["op"] == "batch"  # connected, and a learner
        (shard.keys_dir / "authorized" / "learner" / "learner.key").unlink()
        wait_for(
            lambda: forbidden(call(sock, protocol.Op.SAMPLE)) and stats(shard)["forbidden_total"] >= 2,
            3 * curve.RELOAD_S + 5,
            interval=0.2,
            what="the open connection's sample refused once the key is gone",
        )
    finally:
        sock.close(0)
    refused_before = stats(shard)["curve_refused_total"]
    late = dealer(shard, curve.LEARNER)
    try:
        assert call(late, protocol.Op.SAMPLE, REFUSED_MS) is None
    finally:
        late.close(0)
    wait_for(
        lambda: stats(shard)["curve_refused_total"] > refused_before, 5, what="the new connection refused"
    )
    assert shard.proc.poll() is None
