"""The one place that turns vector-env steps into n-step transitions.

Gymnasium 1.x vector envs reset finished sub-envs automatically, in one of two modes:

* NEXT_STEP (the default): the step that ends an episode returns the true final
  observation; the *following* step ignores the action, returns the reset observation
  and reward 0. That following step is not a transition and is dropped here.
* SAME_STEP: the step that ends an episode returns the reset observation; the true final
  observation is in `info["final_obs"]`.

Each emitted transition is (obs, action, n-step return, next_obs, discount, version):
    return   = r_t + g r_{t+1} + ... + g^{k-1} r_{t+k-1}
    discount = g^k if the learner should bootstrap from next_obs, else 0
A termination (the MDP really ended) gives discount 0. A truncation (a time limit cut the
episode short) still bootstraps: the state after it had a future the agent could not see.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

import numpy as np
from gymnasium.vector import AutoresetMode

FIELDS = ("obs", "action", "reward", "next_obs", "discount", "version")


class RealSteps:
    """Which sub-env steps of a vector step are real transitions, and the true next
    observation of each: what every builder here (and actors/unroll.py) starts from."""

    def __init__(self, num_envs: int, mode: AutoresetMode):
        if mode not in (AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP):
            raise ValueError(f"unsupported autoreset mode {mode}; use NEXT_STEP or SAME_STEP")
        self.mode = mode
        self.skip = np.zeros(num_envs, dtype=bool)  # NEXT_STEP: the coming step is a reset

    def of(self, next_obs, terminated, truncated, info) -> Iterator[tuple[int, np.ndarray]]:
        """(sub-env, true next observation) of every real step; consume it whole."""
        done = np.logical_or(terminated, truncated)
        for i in range(len(self.skip)):
            if self.skip[i]:
                continue  # the reset step after an episode end: obs is new, action ignored
            final = next_obs[i]
            if self.mode is AutoresetMode.SAME_STEP and done[i]:
                final = info["final_obs"][i]
            yield i, final
        if self.mode is AutoresetMode.NEXT_STEP:
            self.skip = done.copy()


class NStepAdder:
    """Example:
    adder = NStepAdder(num_envs=8, n_step=3, gamma=0.99, mode=AutoresetMode.NEXT_STEP)
    adder.add(obs, actions, rewards, next_obs, terminated, truncated, info, version)
    chunk = adder.take(64)  # dict of arrays once 64 transitions are ready, else None
    """

    def __init__(self, num_envs: int, n_step: int, gamma: float, mode: AutoresetMode):
        self.steps = RealSteps(num_envs, mode)
        self.n, self.gamma, self.mode = n_step, gamma, mode
        self.windows: list[deque] = [deque() for _ in range(num_envs)]
        self.ready: list[tuple] = []

    def add(self, obs, actions, rewards, next_obs, terminated, truncated, info, version: int) -> None:
        """Feed one vector step: arrays with one entry per sub-env."""
        for i, final in self.steps.of(next_obs, terminated, truncated, info):
            window = self.windows[i]
            window.append((obs[i], actions[i], float(rewards[i]), version))
            if terminated[i]:
                self._flush(window, final, bootstrap=False)
            elif truncated[i]:
                self._flush(window, final, bootstrap=True)
            elif len(window) == self.n:
                self._emit(window, final, bootstrap=True)
                window.popleft()

    def take(self, count: int) -> dict[str, np.ndarray] | None:
        """The oldest `count` ready transitions as column arrays, or None if fewer are ready."""
        if len(self.ready) < count:
            return None
        rows, self.ready = self.ready[:count], self.ready[count:]
        cols = list(zip(*rows, strict=True))
        return {
            "obs": np.stack(cols[0]),
            "action": np.stack(cols[1]),  # int64 indices, or float32 vectors for Box spaces
            "reward": np.asarray(cols[2], dtype=np.float32),
            "next_obs": np.stack(cols[3]),
            "discount": np.asarray(cols[4], dtype=np.float32),
            "version": np.asarray(cols[5], dtype=np.int64),
        }

    def _flush(self, window: deque, final, bootstrap: bool) -> None:
        while window:
            self._emit(window, final, bootstrap)
            window.popleft()

    def _emit(self, window: deque, next_obs, bootstrap: bool) -> None:
        ret = 0.0
        for k, (_, _, r, _) in enumerate(window):
            ret += self.gamma**k * r
        obs, action, _, version = window[0]
        discount = self.gamma ** len(window) if bootstrap else 0.0
        self.ready.append((obs, action, ret, next_obs, discount, version))


class FrameAdder:
    """NStepAdder for stacked pixel observations that sends each new frame once.

    `obs[i]` is a stack of frames, newest last (gymnasium FrameStackObservation, padding
    "reset": an episode's first observation repeats its first frame). Only the newest
    frame of each observation is new, so a chunk carries those frames once (`frame`,
    `frame_key`, `frame_prev`: the key of the frame before it in its episode, or its own
    key at an episode start) and names each transition's obs and next_obs by the key of
    their newest frame; the replay shard rebuilds the stacks (replay/frames.py). n-step
    returns are still assembled here, by the NStepAdder inside, which sees each episode in
    order. Keys are `stream << 40` plus a counter: pass a stream unique per actor.

    Example:
        adder = FrameAdder(num_envs=8, n_step=3, gamma=0.99, mode=AutoresetMode.NEXT_STEP, stream=5)
        adder.add(obs, actions, rewards, next_obs, terminated, truncated, info, version)
        chunk = adder.take(64)  # transitions + the frames first seen since the last chunk
    """

    def __init__(self, num_envs: int, n_step: int, gamma: float, mode: AutoresetMode, stream: int):
        self.nstep = NStepAdder(num_envs, n_step, gamma, mode)
        self.next_key = stream << 40
        self.cur = np.full(num_envs, -1, np.int64)  # key of each sub-env's current obs
        self.frames: list[np.ndarray] = []
        self.keys: list[int] = []
        self.prevs: list[int] = []
        self.frame_shape: tuple[int, ...] = ()

    def add(self, obs, actions, rewards, next_obs, terminated, truncated, info, version: int) -> None:
        """Feed one vector step, exactly as NStepAdder.add."""
        same_step = self.nstep.mode is AutoresetMode.SAME_STEP
        done = np.logical_or(terminated, truncated)
        nxt = np.empty(len(self.cur), np.int64)
        final = np.full(len(self.cur), -1, np.int64)
        for i in range(len(self.cur)):
            if self.cur[i] < 0:  # the first observation after the env was built
                self.cur[i] = self._frame(obs[i], None)
            if self.nstep.steps.skip[i]:  # NEXT_STEP: this step only resets; next_obs starts an episode
                nxt[i] = self._frame(next_obs[i], None)
            elif same_step and done[i]:  # next_obs already belongs to the new episode
                final[i] = self._frame(info["final_obs"][i], int(self.cur[i]))
                nxt[i] = self._frame(next_obs[i], None)
            else:
                nxt[i] = self._frame(next_obs[i], int(self.cur[i]))
        self.nstep.add(self.cur, actions, rewards, nxt, terminated, truncated, {"final_obs": final}, version)
        self.cur = nxt

    def restart(self, obs: np.ndarray) -> None:
        """Start every sub-env's frame chain afresh from its current stacked observation.

        For when the shard lost frames this adder counted on (a chunk dropped when the
        actor moved to another shard, or refused): transitions still in the n-step windows
        and frames not sent yet are dropped, and each current frame is sent again as if an
        episode started there, so the next stacks repeat it instead of their true history
        for a few steps; no later insert names a frame the shard lacks.
        """
        self.nstep = NStepAdder(len(self.cur), self.nstep.n, self.nstep.gamma, self.nstep.mode)
        self.frames, self.keys, self.prevs = [], [], []
        self.cur = np.array([self._frame(o, None) for o in obs], np.int64)

    def take(self, count: int) -> dict[str, np.ndarray] | None:
        """The oldest `count` ready transitions plus every frame not sent yet, or None."""
        chunk = self.nstep.take(count)
        if chunk is None:
            return None
        frames = np.stack(self.frames) if self.frames else np.zeros((0, *self.frame_shape), np.uint8)
        chunk.update(
            frame=frames,
            frame_key=np.asarray(self.keys, np.int64),
            frame_prev=np.asarray(self.prevs, np.int64),
        )
        self.frames, self.keys, self.prevs = [], [], []
        return chunk

    def _frame(self, stacked: np.ndarray, prev: int | None) -> int:
        key = self.next_key
        self.next_key += 1
        newest = np.array(stacked[-1], np.uint8)  # a copy: vector envs reuse their buffers
        self.frame_shape = newest.shape
        self.frames.append(newest)
        self.keys.append(key)
        self.prevs.append(key if prev is None else prev)
        return key
