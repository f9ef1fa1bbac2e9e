"""Randomized malformed records in Redis: model manifests, checkpoint manifests and metadata,
the ledger and the stats hashes. Readers must refuse them with ProtocolError (or skip them)
and never crash, since anyone with write access to a shard can put anything there.

Checksums do not help against a writer that recomputes them, so the checkpoint cases store
garbage under a valid digest.
"""

from __future__ import annotations

import contextlib
import json
import os

import msgpack
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis_shards import Shards, shards_fixture

from canopy.cache import blob
from canopy.cluster import status
from canopy.config import LearnerConfig
from canopy.errors import ProtocolError
from canopy.keys import Keys
from canopy.learner.algorithms.dqn import DQN
from canopy.learner.checkpoint.placement import make_plan
from canopy.learner.checkpoint.state import Capturer, Snapshot
from canopy.learner.checkpoint.store import CheckpointStore, digest
from canopy.learner.checkpoint.writer import Writer
from canopy.learner.network import ARCH, QNetwork
from canopy.learner.publisher import Publisher
from canopy.lease import Lease

EXAMPLES = int(os.environ.get("CANOPY_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=16,
)
TEXTISH = st.text(max_size=30) | st.binary(max_size=30) | st.integers().map(str) | st.floats().map(str)

shards = shards_fixture(2)


def mutated(valid: dict, fields: st.SearchStrategy) -> st.SearchStrategy[dict]:
    """`valid` with some fields replaced by `fields` values, some dropped, some added."""
    keys = sorted(valid)
    return st.builds(
        lambda repl, drop, extra: {
            **{k: v for k, v in valid.items() if k not in drop},
            **repl,
            **extra,
        },
        st.dictionaries(st.sampled_from(keys), fields, max_size=4),
        st.sets(st.sampled_from(keys), max_size=2),
        st.dictionaries(st.text(max_size=8), fields, max_size=2),
    )


def test_model_manifests_from_redis_are_parsed_or_refused(shards: Shards) -> None:
    r = shards.clients()[0]
    keys = Keys("fuzz-model")
    torch.manual_seed(0)
    version = Publisher(r, keys, learner_id=0, keep=2).publish(
        QNetwork(4, 2, [8]).export(), step=1, arch=ARCH
    )
    valid = {k.decode(): v.decode() for k, v in r.hgetall(keys.model_manifest(version)).items()}
    text = st.text(max_size=12) | st.sampled_from(["<f4", "|u1", "w"])
    layout = st.lists(st.tuples(text, text, st.lists(st.integers(-5, 2**40)) | JSON, JSON), max_size=3)
    fields = TEXTISH | layout.map(json.dumps) | JSON.map(json.dumps)

    @FUZZ
    @given(mutated(valid, fields))
    def run(fields: dict) -> None:
        r.delete(keys.model_manifest(version))
        r.hset(keys.model_manifest(version), mapping=fields)
        with contextlib.suppress(ProtocolError):
            blob.read(r, keys, version)

    run()


def test_checkpoint_recovery_skips_garbage_under_valid_digests(shards: Shards) -> None:
    clients = shards.clients()
    keys = Keys("fuzz-ckpt")
    lease = Lease(clients[0], keys, learner=0, ttl_s=60.0)
    assert lease.try_acquire()
    store = CheckpointStore(clients, keys, make_plan(["h0", "h1"], 2), chunk_bytes=4096, keep=3)
    writer = Writer(store, 0, lambda *a, **k: None)
    torch.manual_seed(0)
    algo = DQN(QNetwork(4, 2, [16]), LearnerConfig())
    algo.updates = 5
    ckpt = f"{lease.epoch}.5"
    assert writer.submit(Capturer().capture(algo, {}, {}), ckpt, lease.token)
    assert writer.wait_idle(30)
    good = store.manifest(ckpt)
    forged = f"{lease.epoch + 1}.1"
    docs = JSON.map(lambda v: json.dumps(v).encode()) | mutated(good, JSON).map(
        lambda m: json.dumps(m).encode()
    )
    members = st.lists(st.text(min_size=1, max_size=12) | st.just(forged), max_size=3)

    @FUZZ
    @given(docs, members)
    def run(doc: bytes, ids: list[str]) -> None:
        for r in clients:
            r.delete(keys.ckpt_manifest(forged))
            r.zremrangebyscore(keys.ckpt_index, 1e9, 1e9)  # the previous example's members
            r.hset(keys.ckpt_manifest(forged), mapping={"doc": doc, "digest": digest(doc)})
            if members := {i: 1e9 for i in ids if i != ckpt}:
                r.zadd(keys.ckpt_index, members)
        loaded = store.recover()
        assert loaded is not None and loaded.ckpt == ckpt  # forged entries have no chunks

    try:
        run()
    finally:
        writer.close()


@FUZZ
@given(
    st.binary(max_size=200) | JSON.map(lambda v: msgpack.packb(v, use_bin_type=True)), st.binary(max_size=64)
)
def test_checkpoint_metadata_is_parsed_or_refused(meta: bytes, flat: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        Snapshot.from_bytes(meta, flat)


def test_checkpoint_metadata_with_a_plausible_shape_is_parsed_or_refused() -> None:
    torch.manual_seed(0)
    snap = Capturer().capture(DQN(QNetwork(4, 2, [8]), LearnerConfig()), {}, {})
    flat = bytes(snap.flat.numpy())

    @FUZZ
    @given(mutated(snap.meta, JSON))
    def run(meta: dict) -> None:
        with contextlib.suppress(ProtocolError):
            Snapshot.from_bytes(msgpack.packb(meta, use_bin_type=True), flat)

    run()


def test_the_policy_lag_reader_survives_a_garbage_ledger(shards: Shards) -> None:
    r = shards.clients()[0]
    keys = Keys("fuzz-ledger")

    @FUZZ
    @given(TEXTISH, st.dictionaries(st.text(min_size=1, max_size=5), TEXTISH, min_size=1, max_size=5))
    def run(latest: str | bytes, acting: dict) -> None:
        r.set(keys.model_latest, latest)
        r.delete(keys.alive("actor"))
        r.zadd(keys.alive("actor"), dict.fromkeys(acting, 1.0))  # members: ids or garbage
        for ident, value in acting.items():
            if ident.isascii() and ident.isdigit():
                r.set(keys.ledger_actor(int(ident)), value)
        assert status.policy_lag(r, keys).startswith("policy lag")

    run()


@FUZZ
@given(st.dictionaries(st.binary(max_size=12), st.binary(max_size=12), max_size=6), st.floats() | st.none())
def test_a_status_row_survives_a_garbage_stats_hash(stats: dict, deadline: float | None) -> None:
    row = status.row("actor", 3, stats, deadline, now=1e9)
    assert row["role"] == "actor" and row["id"] == 3
    assert isinstance(row["alive"], bool)
