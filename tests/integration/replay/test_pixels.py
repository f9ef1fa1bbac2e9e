"""Pixel tables behind real ZeroMQ sockets: FrameAdder chunks in, rebuilt stacks out, bad
frame references refused while the shard keeps serving."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator

import msgpack
import numpy as np
import pytest
from gymnasium.vector import AutoresetMode

from canopy import wire
from canopy.actors.adder import FrameAdder
from canopy.config import ReplayConfig
from canopy.errors import ProtocolError
from canopy.replay.connect import request_stats
from canopy.replay.insert import InsertClient
from canopy.replay.packed import Unpacker
from canopy.replay.sample import SampleClient, to_tensors
from canopy.replay.server import ReplayServer

TIMEOUT_S = 10.0
STACK, ENVS, EPISODE = 4, 2, 7


@pytest.fixture
def endpoint() -> Iterator[str]:
    server = ReplayServer(ReplayConfig(min_size=1, samples_per_insert=0.0, capacity=200, frame_stack=STACK))
    bound = server.bind("tcp://127.0.0.1:0")
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, args=(stop,), daemon=True)
    thread.start()
    try:
        yield bound
    finally:
        stop.set()
        thread.join(timeout=TIMEOUT_S)


def stacked_steps(steps: int) -> Iterator[tuple]:
    """A 2-env stream, frames 8x8 filled with 10 * env + episode step; episodes are truncated
    after EPISODE steps."""

    def frame(env: int, step: int) -> np.ndarray:
        return np.full((8, 8), 10 * env + step, np.uint8)

    stacks = [[frame(e, 0)] * STACK for e in range(ENVS)]
    for t in range(1, steps + 1):
        obs = np.stack([np.stack(s) for s in stacks])
        truncated = np.full(ENVS, t % EPISODE == 0)
        final = []
        for e in range(ENVS):
            stacks[e] = [*stacks[e][1:], frame(e, (t - 1) % EPISODE + 1)]
            final.append(np.stack(stacks[e]))
            if truncated[e]:  # SAME_STEP autoreset: next_obs is the new episode's first
                stacks[e] = [frame(e, 0)] * STACK
        next_obs = np.stack([np.stack(s) for s in stacks])
        yield obs, next_obs, truncated, {"final_obs": np.stack(final)}


def test_stacks_rebuilt_on_the_shard_match_what_the_env_showed(endpoint: str):
    adder = FrameAdder(ENVS, 1, 0.9, AutoresetMode.SAME_STEP, stream=1)
    inserter = InsertClient(endpoint, inflight=4)
    sent_bytes = 0
    for obs, next_obs, truncated, info in stacked_steps(40):
        zeros = np.zeros(ENVS)
        adder.add(obs, zeros.astype(np.int64), zeros, next_obs, zeros.astype(bool), truncated, info, 0)
        chunk = adder.take(8)
        if chunk is not None:
            sent_bytes += chunk["frame"].nbytes
            inserter.insert(chunk, timeout=TIMEOUT_S)
    inserter.flush(timeout=TIMEOUT_S)
    inserter.close()
    assert sent_bytes <= (41 + 40 // EPISODE) * ENVS * 64  # each frame once, + one per episode start
    sampler = SampleClient([endpoint], batch=64, inflight=1)
    try:
        batch = sampler.next(timeout=TIMEOUT_S)
    finally:
        sampler.close()
    assert batch["obs"].shape == (64, STACK, 8, 8) and batch["obs"].dtype == np.uint8
    for obs, nxt in zip(
        batch["obs"][:, :, 0, 0].tolist(), batch["next_obs"][:, :, 0, 0].tolist(), strict=True
    ):
        env = obs[-1] // 10
        steps = [v - 10 * env for v in obs]
        # a stack counts up by one within its episode and repeats the first frame before it
        pairs = list(itertools.pairwise(steps))
        assert all(b - a == 1 if b > 1 else b - a in (0, 1) for a, b in pairs)
        assert nxt[:-1] == obs[1:] and nxt[-1] == obs[-1] + 1


def test_a_sample_client_gets_the_same_stacks_from_unique_frames_as_the_shard_holds(endpoint: str):
    adder = FrameAdder(ENVS, 1, 0.9, AutoresetMode.SAME_STEP, stream=2)
    inserter = InsertClient(endpoint, inflight=4)
    for obs, next_obs, truncated, info in stacked_steps(60):  # several episodes per env
        zeros = np.zeros(ENVS)
        adder.add(obs, zeros.astype(np.int64), zeros, next_obs, zeros.astype(bool), truncated, info, 0)
        if (chunk := adder.take(8)) is not None:
            inserter.insert(chunk, timeout=TIMEOUT_S)
    inserter.flush(timeout=TIMEOUT_S)
    inserter.close()
    whole = SampleClient([endpoint], batch=64, inflight=1)
    sampler = SampleClient([endpoint], batch=64, inflight=1)
    try:
        # The same raw request without `unique_frames`: the shard's own full stacks.
        stacks: dict[tuple[int, int], tuple] = {}
        for _ in range(5):
            plain = _full_stack_sample(whole, 64)
            for i, (s, g) in enumerate(zip(plain["slot"].tolist(), plain["gen"].tolist(), strict=True)):
                stacks[s, g] = (plain["obs"][i], plain["next_obs"][i])
        for _ in range(5):
            b = sampler.next(timeout=TIMEOUT_S)
            assert b["obs"].shape == (64, STACK, 8, 8) and b["next_obs"].dtype == np.uint8
            for i, (s, g) in enumerate(zip(b["slot"].tolist(), b["gen"].tolist(), strict=True)):
                if (s, g) in stacks:
                    np.testing.assert_array_equal(b["obs"][i], stacks[s, g][0])
                    np.testing.assert_array_equal(b["next_obs"][i], stacks[s, g][1])
            # One-step transitions travel as one window of frames an item, which both
            # stacks view: no copy on the client, and torch views those views in turn.
            assert np.shares_memory(b["obs"], b["next_obs"])
            tensors = to_tensors(b, "cpu", names=("obs", "next_obs"))
            assert np.shares_memory(tensors["obs"].numpy(), b["obs"])
        # Five frames an item: a reply weighs less than two whole stacks an item.
        assert sampler.bytes_received_total < 5 * 64 * 2 * STACK * 64
    finally:
        whole.close()
        sampler.close()


def _full_stack_sample(client: SampleClient, batch: int) -> dict:
    """A packed sample without `unique_frames` on the client's socket: whole stacks."""
    sock = client.shards[0].sock
    while sock.poll(0):  # the client's own prefetched replies
        sock.recv_multipart()
    sock.send(msgpack.packb({"op": "sample", "batch": batch, "req": -1, "packed": True}))
    assert sock.poll(int(TIMEOUT_S * 1000))
    msg = wire.decode(sock.recv_multipart(), 1 << 26)
    while msg.header.get("req") != -1:
        msg = wire.decode(sock.recv_multipart(), 1 << 26)
    return Unpacker()(msg.header, msg.arrays)


def test_a_chunk_naming_frames_the_shard_never_got_is_refused_and_the_shard_keeps_serving(endpoint: str):
    inserter = InsertClient(endpoint, inflight=1)
    good = {
        "frame": np.zeros((2, 8, 8), np.uint8),
        "frame_key": np.array([1, 2], np.int64),
        "frame_prev": np.array([1, 1], np.int64),
        "obs": np.array([1], np.int64),
        "next_obs": np.array([2], np.int64),
    }
    try:
        inserter.insert(good, timeout=TIMEOUT_S)
        inserter.flush(timeout=TIMEOUT_S)
        bad = {**good, "frame_key": np.array([3, 4], np.int64), "frame_prev": np.array([99, 3], np.int64)}
        inserter.insert(bad, timeout=TIMEOUT_S)
        with pytest.raises(ProtocolError, match="does not hold"):
            inserter.flush(timeout=TIMEOUT_S)
        inserter.insert(
            {
                **good,
                "frame_key": np.array([5, 6], np.int64),
                "frame_prev": np.array([2, 5], np.int64),
                "obs": np.array([5], np.int64),
                "next_obs": np.array([6], np.int64),
            },
            timeout=TIMEOUT_S,
        )
        inserter.flush(timeout=TIMEOUT_S)
    finally:
        inserter.close()
    stats = request_stats(endpoint, timeout=TIMEOUT_S)
    assert stats["rejected_total"] == 1
    assert stats["main_items"] == 2 and stats["main_frames_alive"] == 4
    assert stats["rss_bytes"] > 0 and stats["main_bytes_per_item"] > 0  # memory accounting
