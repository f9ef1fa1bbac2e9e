"""learner/checkpoint/state.py: capture/restore of the whole learner state, bit for bit on CPU."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from canopy.config import Config, LearnerConfig, to_dict
from canopy.errors import ProtocolError
from canopy.learner.algorithms.dqn import DQN, Batch
from canopy.learner.checkpoint.state import Capturer, Snapshot, load_sampler_state, restore, sampler_state
from canopy.learner.network import QNetwork
from canopy.replay.client import SampleClient

OBS, ACTIONS = 4, 2


def build(seed: int) -> DQN:
    torch.manual_seed(seed)
    return DQN(QNetwork(OBS, ACTIONS, [32, 32]), LearnerConfig(target_update_period=3))


def random_batch(n: int = 32) -> Batch:
    """Draws from all three RNGs, so a badly restored RNG changes the data and the update."""
    noise = float(np.random.standard_normal()) + random.random()
    return Batch(
        obs=torch.randn(n, OBS) + noise,
        action=torch.randint(0, ACTIONS, (n,)),
        reward=torch.randn(n),
        next_obs=torch.randn(n, OBS),
        discount=torch.full((n,), 0.97),
    )


def train(algo: DQN, steps: int) -> None:
    for _ in range(steps):
        algo.update(random_batch())


def state_of(algo: DQN) -> list[torch.Tensor]:
    opt = algo.optimizer.state_dict()["state"]
    return [
        *algo.online.state_dict().values(),
        *algo.target.state_dict().values(),
        *(v for st in opt.values() for v in st.values()),
    ]


def test_restoring_and_continuing_gives_bit_for_bit_the_same_updates_as_not_stopping() -> None:
    random.seed(1)
    np.random.seed(1)
    algo = build(seed=7)
    train(algo, 5)
    cfg = to_dict(Config())
    snap = Capturer().capture(algo, {"epoch": 3, "version_step": 5}, cfg)
    wire_meta, wire_flat = snap.meta_bytes(), bytes(snap.flat.numpy())

    train(algo, 7)  # the run that never stopped
    expected = [t.clone() for t in state_of(algo)]

    # A fresh process: different seeds, fresh objects, RNGs disturbed.
    random.seed(99)
    np.random.seed(99)
    fresh = build(seed=123)
    counters = restore(fresh, Snapshot.from_bytes(wire_meta, wire_flat))
    assert counters["epoch"] == 3 and counters["updates"] == 5 and fresh.updates == 5
    train(fresh, 7)
    assert fresh.updates == algo.updates
    got = state_of(fresh)
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)  # bitwise equal, not merely close


def test_capture_reuses_two_buffers_and_never_the_one_the_writer_holds() -> None:
    algo = build(seed=0)
    train(algo, 1)
    cap = Capturer()
    a = cap.capture(algo, {}, {})
    b = cap.capture(algo, {}, {}, avoid=a.flat)
    c = cap.capture(algo, {}, {}, avoid=b.flat)
    assert a.flat.data_ptr() != b.flat.data_ptr()
    assert c.flat.data_ptr() == a.flat.data_ptr()
    d = cap.capture(algo, {}, {}, avoid=a.flat)
    assert d.flat.data_ptr() == b.flat.data_ptr()


def test_metadata_that_disagrees_with_the_bytes_is_rejected() -> None:
    algo = build(seed=0)
    train(algo, 1)
    snap = Capturer().capture(algo, {}, {})
    flat = bytes(snap.flat.numpy())
    with pytest.raises(ProtocolError, match="covers"):
        Snapshot.from_bytes(snap.meta_bytes(), flat[:-4])
    with pytest.raises(ProtocolError, match=r"msgpack|format"):
        Snapshot.from_bytes(b"\xc1not msgpack", flat)


def sample_client(seed: int) -> SampleClient:
    # Nothing listens there: the client's own state is under test, not a shard's replies.
    return SampleClient(["tcp://127.0.0.1:9", "tcp://127.0.0.1:9"], 8, 1, anneal_batches=100, seed=seed)


def test_the_sample_clients_shard_draws_and_importance_exponent_continue_after_a_restore() -> None:
    algo = build(seed=0)
    before, after = sample_client(seed=5), sample_client(seed=99)
    try:
        shares = np.array([0.3, 0.7])
        for _ in range(11):  # what `next` does per batch: draw a shard, count the batch
            before.rng.choice(2, p=shares)
            before.batches += 1
        snap = Capturer().capture(algo, {"sampler": sampler_state(before)}, {})
        wire_meta, wire_flat = snap.meta_bytes(), bytes(snap.flat.numpy())
        expected = [int(before.rng.choice(2, p=shares)) for _ in range(50)]

        counters = restore(build(seed=1), Snapshot.from_bytes(wire_meta, wire_flat))
        load_sampler_state(after, counters["sampler"])
        assert after.batches == 11 and after.beta == before.beta
        assert [int(after.rng.choice(2, p=shares)) for _ in range(50)] == expected
    finally:
        before.close()
        after.close()


@pytest.mark.parametrize(
    "state",
    [{}, {"rng": "not json", "batches": 1}, {"rng": '{"bit_generator": "MT19937"}', "batches": 1}],
    ids=["empty", "rng-not-json", "other-generator"],
)
def test_a_malformed_sample_client_state_is_rejected(state: dict) -> None:
    client = sample_client(seed=0)
    try:
        with pytest.raises(ProtocolError, match="sampler"):
            load_sampler_state(client, state)
    finally:
        client.close()
