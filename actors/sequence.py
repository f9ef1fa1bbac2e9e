"""The one place that cuts vector-env steps into overlapping fixed-length sequences for r2d2.

Beside actors/adder.py (n-step transitions) and actors/unroll.py (on-policy unrolls), fed
the same way: one call per vector step, plus the recurrent state each sub-env acted from.
A sequence of length T holds one sub-env's consecutive steps of one episode:

    obs         [T + 1, ...]  obs[t] acted on at step t; obs[L] the observation after the
                              last of its L real steps (what the last steps bootstrap from)
    action      [T]           int64 indices
    reward      [T]
    terminated  [T]           1 at the last real step when the MDP really ended there
    mask        [T]           1 for the L real steps, 0 for padding after them
    fresh       []            1 when obs[0] is an episode's first observation
    h0, c0      [H]           the LSTM state the actor acted on obs[0] from (the "stored state")
    version     [T]           the policy version that acted

Consecutive sequences of an episode start every T - overlap steps, so each shares its first
`overlap` steps with the one before: the learner's burn-in (learner/algorithms/r2d2.py) runs
over them, and with overlap >= burn-in every step after the episode's first sequence is
learned from in some sequence. A sequence never crosses an episode boundary: an episode's end
(termination or truncation) closes the sequence there, padded to T and masked, with the true
final observation as obs[L]; the next episode starts a fresh sequence from the zero state.
Crossing would need the learner to reset the state mid-sequence and would learn across a
boundary the agent never saw through.

Autoreset modes as in actors/adder.py (RealSteps).
"""

from __future__ import annotations

import numpy as np
from gymnasium.vector import AutoresetMode

from canopy.actors.adder import RealSteps

FIELDS = ("obs", "action", "reward", "terminated", "mask", "fresh", "h0", "c0", "version")


class SequenceAdder:
    """Example:
    adder = SequenceAdder(num_envs=8, length=40, overlap=20, mode=AutoresetMode.NEXT_STEP)
    adder.add(obs, actions, rewards, next_obs, terminated, truncated, info, h, c, version)
    chunk = adder.take(8)  # dict of arrays [8, T(+1), ...] once 8 sequences are ready, else None
    """

    def __init__(self, num_envs: int, length: int, overlap: int, mode: AutoresetMode):
        if length < 1 or not 0 <= overlap < length:
            raise ValueError(f"sequence length {length} and overlap {overlap}: need 0 <= overlap < length")
        self.real = RealSteps(num_envs, mode)
        self.length, self.overlap = length, overlap
        self.steps: list[list[tuple]] = [[] for _ in range(num_envs)]
        self.fresh = [True] * num_envs  # the buffer starts an episode
        self.ready: list[dict[str, np.ndarray]] = []

    def add(self, obs, actions, rewards, next_obs, terminated, truncated, info, h, c, version: int) -> None:
        """Feed one vector step: arrays with one entry per sub-env; (h, c) the state each acted from."""
        for i, final in self.real.of(next_obs, terminated, truncated, info):
            steps = self.steps[i]
            steps.append((obs[i], actions[i], rewards[i], terminated[i], h[i], c[i], version))
            if terminated[i] or truncated[i]:  # closes the sequence: it holds a step not sent yet
                self.ready.append(self._sequence(steps, final, self.fresh[i]))
                steps.clear()
                self.fresh[i] = True
            elif len(steps) == self.length:
                self.ready.append(self._sequence(steps, final, self.fresh[i]))
                del steps[: self.length - self.overlap]  # the next sequence starts with the overlap
                self.fresh[i] = False

    def take(self, count: int) -> dict[str, np.ndarray] | None:
        """The oldest `count` ready sequences stacked along a new first axis, or None if fewer."""
        if len(self.ready) < count:
            return None
        rows, self.ready = self.ready[:count], self.ready[count:]
        return {name: np.stack([row[name] for row in rows]) for name in FIELDS}

    def _sequence(self, steps: list[tuple], bootstrap: np.ndarray, fresh: bool) -> dict[str, np.ndarray]:
        n, t = len(steps), self.length
        obs_rows, actions, rewards, terms, hs, cs, versions = zip(*steps, strict=True)
        # Padding repeats the bootstrap observation: any finite input, since it is masked out.
        obs = np.stack([*obs_rows, *([bootstrap] * (t + 1 - n))])
        return {
            "obs": obs,
            "action": _padded(actions, t, np.int64),
            "reward": _padded(rewards, t, np.float32),
            "terminated": _padded(terms, t, np.float32),
            "mask": _padded([1.0] * n, t, np.float32),
            "fresh": np.float32(fresh),
            "h0": np.asarray(hs[0], np.float32),
            "c0": np.asarray(cs[0], np.float32),
            "version": _padded(versions, t, np.int64),
        }


def _padded(values, length: int, dtype) -> np.ndarray:
    out = np.zeros(length, dtype)
    out[: len(values)] = values
    return out
