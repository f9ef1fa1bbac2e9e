"""Randomized malformed requests against the replay shard's and the cache node's ROUTERs.

Each server runs in its own process (fuzz_worker.py) with CURVE keys on, as deployed. Every
generated message is sent under the key of a role drawn at random (so some are refused as
`forbidden` before they are parsed, the rest parsed under a role that may use their op) and
followed by a valid request on a second socket, which must be answered: the server may
reply to the bad one with an error or drop it, but it must keep serving, and its RSS must
stay bounded.

CI runs CANOPY_FUZZ_EXAMPLES (default 300) cases per endpoint; the nightly-size run is
`CANOPY_FUZZ_EXAMPLES=10000 pytest tests/fuzz`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq
from conftest import RedisServer, stop_process, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from canopy import curve, wire
from canopy.keys import Keys
from canopy.learner.network import ARCH, QNetwork
from canopy.learner.publisher import Publisher
from canopy.redisconn import connect

EXAMPLES = int(os.environ.get("CANOPY_FUZZ_EXAMPLES", "300"))
REPLY_TIMEOUT_MS = 5000
RSS_GROWTH_LIMIT = 64 << 20  # after warm-up; the worker's tables are capped far below this
WORKER = Path(__file__).with_name("fuzz_worker.py")

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(),
    st.text(max_size=40),
    st.binary(max_size=64),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
FIELDS = ["req", "table", "n", "batch", "samples_per_insert", "min_size", "error_buffer", "version", "child"]
ARRAY_NAMES = ["obs", "action", "reward", "next_obs", "discount", "version", "priority", "slot", "gen", "x"]
DTYPES = st.sampled_from(["u1", "i1", "i4", "i8", "u8", "f2", "f4", "f8", "?"])
ServerKeys = tuple[Path, str]  # a key directory and the server kind the worker runs
Worker = tuple[subprocess.Popen, str, ServerKeys]


def headers(ops: list[str]) -> st.SearchStrategy[dict]:
    return st.fixed_dictionaries(
        {"op": st.one_of(st.sampled_from(ops), VALUES)}, optional={f: VALUES for f in FIELDS}
    )


def messages(ops: list[str]) -> st.SearchStrategy[list[bytes]]:
    """Garbage frames, plausible headers with arbitrary frames, or well-formed wire messages
    whose contents are wrong for the server (dtypes, shapes, counts, fields)."""
    garbage = st.lists(st.binary(max_size=600), min_size=1, max_size=4)
    specs = st.lists(
        st.tuples(
            st.sampled_from(ARRAY_NAMES) | st.text(max_size=70),
            st.text(max_size=6) | DTYPES,
            st.lists(st.integers(-3, 70), max_size=4) | VALUES,
        ),
        max_size=4,
    )
    loose = st.builds(
        lambda h, s, frames: [msgpack.packb({**h, "arrays": [list(x) for x in s]}), *frames],
        headers(ops),
        specs,
        st.lists(st.binary(max_size=2048), max_size=5),
    )
    arrays = st.dictionaries(
        st.sampled_from(ARRAY_NAMES),
        hnp.arrays(DTYPES, hnp.array_shapes(min_dims=1, max_dims=3, max_side=12)),
        max_size=6,
    )
    wellformed = st.builds(lambda h, a: [bytes(f) for f in wire.encode(h, a)], headers(ops), arrays)
    return st.one_of(garbage, loose, wellformed)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        line = next(x for x in f if x.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def start_worker(*args: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), *args],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    line = proc.stdout.readline().split()  # the worker prints `ready` once bound, or exits
    if line[:1] != ["ready"]:
        stop_process(proc)
        pytest.fail(f"fuzz worker {args[0]} did not start (exit {proc.poll()})")
    return proc, line[1]


def keyed_dealer(endpoint: str, keys_dir: Path, role: str, server: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    curve.as_client(sock, curve.load_dir(keys_dir, role), server)
    sock.connect(endpoint)
    return sock


class Fuzzer:
    """DEALERs on one server: one per client role for the generated messages, one for the
    health probe (under `probe_role`)."""

    def __init__(self, endpoint: str, probe: dict, keys: ServerKeys, roles: list[str], probe_role: str):
        keys_dir, server = keys
        self.bad = [keyed_dealer(endpoint, keys_dir, role, server) for role in roles]
        self.good = keyed_dealer(endpoint, keys_dir, probe_role, server)
        self.probe, self.req, self.answers = probe, 0, 0

    def check(self, role: int, frames: list[bytes]) -> None:
        self.bad[role].send_multipart(frames)
        self.req += 1
        self.good.send_multipart(wire.encode({**self.probe, "req": self.req}))
        while True:  # replies to earlier probes may still be queued after a slow one
            assert self.good.poll(REPLY_TIMEOUT_MS), f"server stopped answering after {frames!r:.300}"
            msg = wire.decode(self.good.recv_multipart(), 1 << 26)
            if msg.header.get("req") == self.req or msg.header.get("req") is None:
                break
        assert msg.op != "error", f"the valid probe was refused: {msg.header}"
        bad = self.bad[role]
        while bad.poll(0):  # whatever the server said to the bad request must still be wire format
            reply = wire.decode(bad.recv_multipart(), 1 << 26)
            self.answers += reply.op == "error"

    def close(self) -> None:
        for s in [*self.bad, self.good]:
            s.close(0)


def fuzz(worker: Worker, ops: list[str], probe: dict, roles: list[str], probe_role: str) -> Fuzzer:
    proc, endpoint, keys = worker
    pid = proc.pid
    fuzzer = Fuzzer(endpoint, probe, keys, roles, probe_role)
    warm = [0]

    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.integers(0, len(roles) - 1), messages(ops))
    def run(role: int, frames: list[bytes]) -> None:
        fuzzer.check(role, frames)
        if fuzzer.req == min(50, EXAMPLES // 2):
            warm[0] = rss_bytes(pid)

    try:
        run()
    finally:
        fuzzer.close()
    growth = rss_bytes(pid) - warm[0]
    assert growth < RSS_GROWTH_LIMIT, f"server RSS grew {growth >> 20} MiB over {fuzzer.req} bad requests"
    return fuzzer


def serves_latest(endpoint: str, keys_dir: Path) -> bool:
    sock = keyed_dealer(endpoint, keys_dir, curve.ACTOR, curve.CACHE_SERVER)
    try:
        sock.send_multipart(wire.encode({"op": "latest"}))
        return bool(sock.poll(REPLY_TIMEOUT_MS)) and wire.decode(sock.recv_multipart(), 1 << 26).op != "error"
    finally:
        sock.close(0)


@pytest.fixture
def keys_dir(tmp_path: Path) -> Path:
    return curve.generate(tmp_path / "keys")


@pytest.fixture
def replay_worker(keys_dir: Path) -> Iterator[Worker]:
    proc, endpoint = start_worker("replay", str(keys_dir))
    try:
        yield proc, endpoint, (keys_dir, curve.REPLAY_SERVER)
    finally:
        stop_process(proc)


@pytest.fixture
def cache_worker(redis_server: RedisServer, keys_dir: Path) -> Iterator[Worker]:
    r = connect(redis_server.cluster_config(), "test", 0)
    weights = QNetwork(4, 2, [16, 16]).export()
    Publisher(r, Keys("fuzz"), learner_id=0, keep=2).publish(weights, step=0, arch=ARCH)
    r.close()
    args = [str(redis_server.port), redis_server.user, str(redis_server.password_file), "fuzz"]
    proc, endpoint = start_worker("cache", *args, str(keys_dir), *(["tls"] if redis_server.tls else []))
    try:
        wait_for(
            lambda: serves_latest(endpoint, keys_dir), 10, interval=0.1, what="the node fetching the version"
        )
        yield proc, endpoint, (keys_dir, curve.CACHE_SERVER)
    finally:
        stop_process(proc)


@pytest.mark.slow
def test_the_replay_shard_survives_malformed_requests(replay_worker) -> None:
    proc, endpoint, (keys_dir, _) = replay_worker
    ops = ["insert", "sample", "priority", "configure", "stats", "snapshot"]
    roles = [curve.ACTOR, curve.LEARNER, curve.OPERATOR]
    fuzzer = fuzz(replay_worker, ops, {"op": "stats"}, roles, curve.OPERATOR)
    assert proc.poll() is None
    assert fuzzer.answers > 0  # the shard does answer bad requests, not only drop them
    sock = keyed_dealer(endpoint, keys_dir, curve.OPERATOR, curve.REPLAY_SERVER)
    try:
        sock.send_multipart(wire.encode({"op": "stats"}))
        assert sock.poll(REPLY_TIMEOUT_MS)
        stats = wire.decode(sock.recv_multipart(), 1 << 26).header
    finally:
        sock.close(0)
    # The counters move with the refusals; some were for the role, some for the content.
    assert stats["rejected_total"] + stats["forbidden_total"] >= fuzzer.answers // 2
    assert stats["rejected_total"] > 0 and stats["forbidden_total"] > 0


@pytest.mark.slow
def test_the_cache_node_survives_malformed_requests(cache_worker) -> None:
    proc, _, _ = cache_worker
    # The probe fetches the whole version: the node must still reach Redis and serve chunks.
    roles = [curve.ACTOR, curve.EVALUATOR, curve.CACHE]
    fuzzer = fuzz(cache_worker, ["hello", "get", "latest", "hb"], {"op": "latest"}, roles, curve.ACTOR)
    assert proc.poll() is None
    assert fuzzer.answers > 0


def test_the_generators_make_well_formed_messages_the_servers_must_judge_on_content() -> None:
    """The fuzzer is only as good as its inputs: some must pass the wire decoder."""
    passed = []

    @settings(max_examples=200, deadline=None, database=None)
    @given(messages(["insert"]))
    def run(frames: list[bytes]) -> None:
        try:
            wire.decode(frames, 1 << 20)
            passed.append(True)
        except Exception:
            passed.append(False)

    run()
    assert 0 < sum(passed) < len(passed)
    assert np.mean(passed) > 0.1
