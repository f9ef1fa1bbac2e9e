"""Pixel tables: stacks rebuilt from frames stored once equal a brute-force frame stack.

The reference is the plain NStepAdder fed whole stacked observations from a fake vector
env that stacks frames the gymnasium FrameStackObservation way (padding "reset"); the
FrameAdder sees the same steps and its chunks go into a small table, so evictions,
episode ends and truncations all happen while every stored item is compared.
"""

from __future__ import annotations

import numpy as np
import pytest
from gymnasium.vector import AutoresetMode
from hypothesis import given, settings
from hypothesis import strategies as st

from canopy import wire
from canopy.actors.adder import FrameAdder, NStepAdder
from canopy.errors import ProtocolError
from canopy.replay.packed import Layout, Unpacker, rebuild
from canopy.replay.table import Table

FRAME_SHAPE = (2, 2)  # 4 bytes: room for a unique frame id


def frame(ident: int) -> np.ndarray:
    return np.frombuffer(np.uint32(ident).tobytes(), np.uint8).reshape(FRAME_SHAPE)


class StackingEnvs:
    """num_envs episodes of random length, stacked like FrameStackObservation(padding 'reset')."""

    def __init__(self, num_envs: int, stack: int, mode: AutoresetMode, rng: np.random.Generator):
        self.n, self.k, self.mode, self.rng = num_envs, stack, mode, rng
        self.next_id = 0
        self.stacks = [self._reset() for _ in range(num_envs)]
        self.pending_reset = np.zeros(num_envs, bool)

    def _new(self) -> np.ndarray:
        self.next_id += 1
        return frame(self.next_id)

    def _reset(self) -> list[np.ndarray]:
        return [self._new()] * self.k

    def obs(self) -> np.ndarray:
        return np.stack([np.stack(s) for s in self.stacks])

    def step(self) -> tuple:
        obs = self.obs()
        terminated = self.rng.random(self.n) < 0.15
        truncated = ~terminated & (self.rng.random(self.n) < 0.1)
        final = [None] * self.n
        for i in range(self.n):
            if self.pending_reset[i]:  # NEXT_STEP: this step resets, ignoring the action
                self.stacks[i] = self._reset()
                terminated[i] = truncated[i] = False
                continue
            self.stacks[i] = [*self.stacks[i][1:], self._new()]
            if (terminated[i] or truncated[i]) and self.mode is AutoresetMode.SAME_STEP:
                final[i] = np.stack(self.stacks[i])
                self.stacks[i] = self._reset()
        reset_now = self.pending_reset.copy()
        if self.mode is AutoresetMode.NEXT_STEP:
            self.pending_reset = (terminated | truncated) & ~reset_now
        info = {"final_obs": np.stack([f if f is not None else obs[0] for f in final])}
        rewards = self.rng.random(self.n).astype(np.float32)
        return obs, rewards, self.obs(), terminated, truncated, info


def unique_frame_reply(table: Table, slots: np.ndarray) -> tuple[dict[str, np.ndarray], int]:
    """What a client rebuilds from a frame-index sample reply of `slots`, through the wire
    format (replay/packed.py), and how many frames the reply carried. The frames arrive in
    writable memory, as zmq frames received with copy=False do."""
    room = (len(slots) * table.frames_per_item, table.frames.frame_shape)
    layout = Layout(table.item_layout(unique_frames=True), len(slots), room)
    buf = layout.acquire()
    table.gather(slots, buf.views)
    u = table.gather_frames(slots, buf.views, buf.frames)
    head = layout.header({"op": "batch", "req": 1}, u)
    msg = wire.decode([head, bytes(buf.data), bytearray(buf.frames[:u])], 1 << 26)
    return rebuild(Unpacker()(msg.header, msg.arrays)), u


def check_every_item(table: Table, reference: dict[int, tuple[np.ndarray, np.ndarray]]) -> None:
    live = np.flatnonzero(table.seq >= 0)
    if not len(live):
        return
    got = table.gather(live)
    for j, tid in enumerate(got["tid"].tolist()):
        want_obs, want_next = reference[tid]
        np.testing.assert_array_equal(got["obs"][j], want_obs)
        np.testing.assert_array_equal(got["next_obs"][j], want_next)
    # The same items (some twice, as a draw with replacement gives) sent as unique frames.
    slots = np.concatenate([live, live[::2]])
    rebuilt, u = unique_frame_reply(table, slots)
    for name in ("obs", "next_obs"):
        np.testing.assert_array_equal(rebuilt[name], table.gather(slots)[name])
        assert rebuilt[name].flags.writeable
    obs, nxt = (table.stacked[k][slots] for k in ("obs", "next_obs"))
    if np.array_equal(obs[:, 1:], nxt[:, :-1]):  # one-step transitions: a window per item
        assert u == len(slots) * (table.frame_stack + 1)
    else:  # n-step ones: each distinct frame once
        assert u == len(np.unique(np.concatenate([obs.ravel(), nxt.ravel()])))


def check_refcounts(table: Table) -> None:
    """Each frame's count equals the stack entries of live items and pins that name it."""
    store = table.frames
    live = np.flatnonzero(table.seq >= 0)
    named = [table.stacked[k][live].ravel() for k in table.stacked]
    named.append(store.stacks_of[np.fromiter(store.pinned, np.int64)].ravel())
    expected = np.bincount(np.concatenate(named), minlength=store.capacity)
    np.testing.assert_array_equal(store.refs, expected)
    free = np.sort(store.free[: store.nfree])
    np.testing.assert_array_equal(free, np.flatnonzero(expected == 0))


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    num_envs=st.integers(1, 3),
    stack=st.integers(1, 4),
    n_step=st.integers(1, 3),
    capacity=st.integers(3, 40),
    chunk=st.integers(1, 4),
    remover=st.sampled_from(["fifo", "uniform", "lifo", "max_heap"]),
    same_step=st.booleans(),
    steps=st.integers(10, 80),
)
def test_rebuilt_stacks_equal_a_brute_force_frame_stack(
    seed, num_envs, stack, n_step, capacity, chunk, remover, same_step, steps
):
    rng = np.random.default_rng(seed)
    mode = AutoresetMode.SAME_STEP if same_step else AutoresetMode.NEXT_STEP
    envs = StackingEnvs(num_envs, stack, mode, rng)
    whole = NStepAdder(num_envs, n_step, 0.9, mode)
    pixels = FrameAdder(num_envs, n_step, 0.9, mode, stream=3)
    table = Table(capacity, remover=remover, frame_stack=stack, frame_window=64, seed=seed)
    reference: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    tid = 0
    for _ in range(steps):
        obs, rewards, next_obs, terminated, truncated, info = envs.step()
        actions = rng.integers(0, 4, num_envs)
        for adder in (whole, pixels):
            adder.add(obs, actions, rewards, next_obs, terminated, truncated, info, 0)
        while (ref := whole.take(chunk)) is not None:
            got = pixels.take(chunk)
            np.testing.assert_allclose(got["reward"], ref["reward"])
            np.testing.assert_array_equal(got["discount"], ref["discount"])
            got["tid"] = np.arange(tid, tid + chunk)
            for j in range(chunk):
                reference[tid + j] = (ref["obs"][j], ref["next_obs"][j])
            tid += chunk
            if rng.random() < 0.2 and table.size:  # removals out of order (max_times_sampled-like)
                table.remove(rng.choice(np.flatnonzero(table.seq >= 0), size=1))
            table.insert(got)
            check_every_item(table, reference)
            check_refcounts(table)  # a frame lives exactly while an item or a pin needs it


def test_an_episode_start_repeats_its_first_frame_and_never_shows_the_last_episode():
    t = Table(10, frame_stack=3, frame_window=16)
    f = np.stack([frame(i) for i in range(5)])
    # episode A: frames 0, 1; episode B starts at frame 2 and goes on with 3, 4
    chunk = {
        "frame": f,
        "frame_key": np.arange(5, dtype=np.int64),
        "frame_prev": np.array([0, 0, 2, 2, 3], np.int64),
        "obs": np.array([0, 2, 3], np.int64),
        "next_obs": np.array([1, 3, 4], np.int64),
        "action": np.zeros(3, np.int64),
    }
    t.insert(chunk)
    got = t.gather(np.arange(3))
    np.testing.assert_array_equal(got["obs"][0], f[[0, 0, 0]])
    np.testing.assert_array_equal(got["next_obs"][0], f[[0, 0, 1]])
    np.testing.assert_array_equal(got["obs"][1], f[[2, 2, 2]])  # not f[[0, 1, 2]]
    np.testing.assert_array_equal(got["next_obs"][2], f[[2, 3, 4]])
    assert t.stats()["frames_alive"] == 5


def test_a_key_older_than_the_window_is_refused_and_the_table_keeps_serving():
    t = Table(100, frame_stack=2, frame_window=16)

    def chunk(keys: list[int], prev_of_first: int, obs: int) -> dict[str, np.ndarray]:
        prevs = [prev_of_first, *keys[:-1]]
        return {
            "frame": np.stack([frame(k) for k in keys]),
            "frame_key": np.asarray(keys, np.int64),
            "frame_prev": np.asarray(prevs, np.int64),
            "obs": np.array([obs], np.int64),
            "next_obs": np.array([keys[-1]], np.int64),
        }

    t.insert(chunk(list(range(20)), 0, 0))
    with pytest.raises(ProtocolError, match="frame_window"):
        t.insert(chunk([20], 19, 1))  # frame 1 went out of the window
    with pytest.raises(ProtocolError, match="does not hold"):
        t.insert(chunk([21], 2, 20))
    bad = chunk([22], 19, 19)
    bad["frame"] = bad["frame"].astype(np.int16)
    with pytest.raises(ProtocolError, match="uint8"):
        t.insert(bad)
    t.insert(chunk([23], 19, 19))
    assert t.size == 2


def test_a_pixel_transition_costs_about_one_frame():
    stack, frame_shape, items = 4, (84, 84), 2000
    t = Table(items, frame_stack=stack, frame_window=256)
    keys = np.arange(items + 1, dtype=np.int64)
    prevs = np.concatenate([[0], keys[:-1]])
    frames = np.zeros((items + 1, *frame_shape), np.uint8)
    for lo in range(0, items, 100):
        sl = slice(lo + (lo > 0), lo + 101)
        t.insert(
            {
                "frame": frames[sl],
                "frame_key": keys[sl],
                "frame_prev": prevs[sl],
                "obs": keys[lo : lo + 100],
                "next_obs": keys[lo + 1 : lo + 101],
                "action": np.zeros(100, np.int64),
                "reward": np.zeros(100, np.float32),
                "discount": np.zeros(100, np.float32),
                "version": np.zeros(100, np.int64),
            }
        )
    per_item = t.nbytes / t.size
    assert per_item <= 1.2 * 7056, per_item
    assert t.sample(8, np.random.default_rng(0)).arrays["obs"].shape == (8, stack, *frame_shape)


def test_when_frames_run_out_the_remover_evicts_items_and_stacks_stay_right():
    # One-step episodes need two frames per item: more than the ring's 1.5 per item.
    capacity, stack = 4096, 2
    t = Table(capacity, frame_stack=stack, frame_window=16)
    reference: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for lo in range(0, 2 * capacity, 64):
        ids = np.arange(lo, lo + 64)
        starts, ends = 2 * ids, 2 * ids + 1  # frame keys of each episode's two frames
        keys = np.stack([starts, ends], axis=1).ravel()
        t.insert(
            {
                "frame": np.stack([frame(int(k)) for k in keys]),
                "frame_key": keys,
                "frame_prev": np.stack([starts, starts], axis=1).ravel(),
                "obs": starts,
                "next_obs": ends,
                "tid": ids,
            }
        )
        for i, s, e in zip(ids.tolist(), starts.tolist(), ends.tolist(), strict=True):
            reference[i] = (np.stack([frame(s)] * stack), np.stack([frame(s), frame(e)]))
    assert t.frames.nfree >= 0 and t.size < capacity  # items went to make room for frames
    check_every_item(t, reference)
    check_refcounts(t)
