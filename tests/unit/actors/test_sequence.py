"""actors/sequence.py: overlapping sequences of T steps that never cross an episode end,
padded and masked there, each with the recurrent state its first step was acted from."""

from __future__ import annotations

import numpy as np
import pytest
from gymnasium.vector import AutoresetMode

from canopy.actors.sequence import FIELDS, SequenceAdder

NEXT, SAME = AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP


class Feeder:
    """One sub-env whose observation is its global step count and whose recurrent state is
    (t, -t) at that step, fed to a SequenceAdder as a vector env of size 1 would feed it."""

    def __init__(self, adder: SequenceAdder, mode: AutoresetMode):
        self.adder, self.mode, self.t, self.obs = adder, mode, 0, np.array([[0.0]])

    def step(self, end: str = "") -> None:
        term, trunc = np.array([end == "term"]), np.array([end == "trunc"])
        h, c = np.full((1, 3), float(self.t)), np.full((1, 3), -float(self.t))
        self.t += 1
        final = np.array([[float(self.t)]])
        reset = np.array([[1000.0 + self.t]])  # a fresh episode's first observation
        nxt, info = final, {}
        if self.mode is SAME and end:
            nxt, info = reset, {"final_obs": final}
        self.adder.add(self.obs, np.array([self.t]), np.array([1.0]), nxt, term, trunc, info, h, c, self.t)
        self.obs = nxt
        if self.mode is NEXT and end:  # the reset step: action ignored, not a real step
            zero = np.zeros((1, 3))
            self.adder.add(
                nxt, np.array([0]), np.array([0.0]), reset, *[np.array([False])] * 2, {}, zero, zero, 0
            )
            self.obs = reset


def sequences(adder: SequenceAdder) -> list[dict[str, np.ndarray]]:
    out = []
    while (s := adder.take(1)) is not None:
        out.append({k: v[0] for k, v in s.items()})
    return out


@pytest.mark.parametrize("mode", [NEXT, SAME])
def test_sequences_overlap_and_carry_the_state_their_first_step_was_acted_from(mode: AutoresetMode) -> None:
    adder = SequenceAdder(1, length=6, overlap=2, mode=mode)
    feed = Feeder(adder, mode)
    for _ in range(14):
        feed.step()
    seqs = sequences(adder)
    assert len(seqs) == 3  # steps 0-5, 4-9, 8-13: a new one every T - overlap = 4 steps
    for k, s in enumerate(seqs):
        first = 4 * k
        np.testing.assert_array_equal(s["obs"][:, 0], np.arange(first, first + 7))  # T + 1 observations
        np.testing.assert_array_equal(s["action"], np.arange(first + 1, first + 7))
        np.testing.assert_array_equal(s["mask"], np.ones(6))
        np.testing.assert_array_equal(s["h0"], np.full(3, first))  # the stored state
        np.testing.assert_array_equal(s["c0"], np.full(3, -first))
        assert s["fresh"] == (1.0 if k == 0 else 0.0)
        assert not s["terminated"].any()
    # the overlap: each sequence's first `overlap` steps are the last of the one before
    np.testing.assert_array_equal(seqs[1]["obs"][:2], seqs[0]["obs"][4:6])
    assert set(seqs[0]) == set(FIELDS)


@pytest.mark.parametrize("mode", [NEXT, SAME])
@pytest.mark.parametrize("end", ["term", "trunc"])
def test_an_episode_end_closes_the_sequence_padded_and_masked_and_the_next_starts_fresh(
    mode: AutoresetMode, end: str
) -> None:
    adder = SequenceAdder(1, length=6, overlap=2, mode=mode)
    feed = Feeder(adder, mode)
    for _ in range(8):  # one full sequence (steps 0-5), then 6, 7 ...
        feed.step()
    feed.step(end)  # ... 8 ends the episode
    for _ in range(3):
        feed.step()
    assert adder.take(3) is None
    _, tail = sequences(adder)
    # the tail: steps 4-8 (the overlap 4, 5 again), 5 real steps, masked after them
    np.testing.assert_array_equal(tail["mask"], [1, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(tail["action"], [5, 6, 7, 8, 9, 0])
    np.testing.assert_array_equal(tail["terminated"], [0, 0, 0, 0, float(end == "term"), 0])
    assert tail["obs"][5, 0] == 9.0  # the true final observation, not the reset one
    assert tail["fresh"] == 0.0 and tail["h0"][0] == 4.0
    assert not (tail["obs"] >= 1000).any()  # nothing of the next episode
    # the next episode starts a new sequence from its reset observation and the zero state
    for _ in range(3):
        feed.step()
    (nxt,) = sequences(adder)
    assert nxt["obs"][0, 0] > 1000 and nxt["fresh"] == 1.0
    np.testing.assert_array_equal(nxt["mask"], np.ones(6))


def test_an_end_right_after_a_full_sequence_sends_nothing_already_sent() -> None:
    adder = SequenceAdder(1, length=4, overlap=2, mode=NEXT)
    feed = Feeder(adder, NEXT)
    for _ in range(3):
        feed.step()
    feed.step("term")  # the 4th step fills a sequence and ends the episode at once
    seqs = sequences(adder)
    assert len(seqs) == 1
    np.testing.assert_array_equal(seqs[0]["terminated"], [0, 0, 0, 1])


def test_bad_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="overlap"):
        SequenceAdder(1, length=4, overlap=4, mode=NEXT)
