"""actors/unroll.py: unrolls of T steps, across episode ends, truncations and autoresets."""

from __future__ import annotations

import numpy as np
import pytest
from gymnasium.vector import AutoresetMode

from canopy.actors.unroll import FIELDS, UnrollAdder

NEXT, SAME = AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP


class Feeder:
    """One sub-env whose observation is the step count, fed to an UnrollAdder as a vector env
    of size 1 would feed it; `step(end)` with end in {"", "term", "trunc"}."""

    def __init__(self, adder: UnrollAdder, mode: AutoresetMode):
        self.adder, self.mode, self.t, self.obs = adder, mode, 0, np.array([[0.0]])

    def step(self, end: str = "", reward: float = 1.0) -> None:
        self.t += 1
        term, trunc = np.array([end == "term"]), np.array([end == "trunc"])
        final = np.array([[float(self.t)]])
        reset = np.array([[100.0 + self.t]])  # a fresh episode's first observation
        nxt, info = final, {}
        if self.mode is SAME and end:
            nxt, info = reset, {"final_obs": final}
        logp = np.array([-0.5 * self.t])
        self.adder.add(self.obs, np.array([self.t]), np.array([reward]), nxt, term, trunc, info, logp, self.t)
        self.obs = nxt
        if self.mode is NEXT and end:  # the reset step: action ignored, reward 0, new obs
            self.adder.add(nxt, np.array([0]), np.array([0.0]), reset, *[np.array([False])] * 2, {}, [0.0], 0)
            self.obs = reset


def unrolls(adder: UnrollAdder) -> list[dict[str, np.ndarray]]:
    out = []
    while (u := adder.take(1)) is not None:
        out.append({k: v[0] for k, v in u.items()})
    return out


@pytest.mark.parametrize("mode", [NEXT, SAME])
def test_unrolls_without_episode_ends_chain_and_bootstrap_from_the_next_observation(mode) -> None:
    adder = UnrollAdder(1, 3, mode)
    feed = Feeder(adder, mode)
    for _ in range(6):
        feed.step()
    first, second = unrolls(adder)
    assert first["obs"][:, 0].tolist() == [0, 1, 2, 3] and second["obs"][:, 0].tolist() == [3, 4, 5, 6]
    assert first["mask"].tolist() == [1, 1, 1] and first["version"].tolist() == [1, 2, 3]
    assert first["logp"].tolist() == [-0.5, -1.0, -1.5] and first["action"].tolist() == [1, 2, 3]


@pytest.mark.parametrize("mode", [NEXT, SAME])
def test_a_termination_inside_an_unroll_continues_with_the_next_episode(mode) -> None:
    adder = UnrollAdder(1, 4, mode)
    feed = Feeder(adder, mode)
    feed.step()
    feed.step("term")  # obs 1 -> final 2; the next episode starts at 102
    feed.step()
    feed.step()
    (u,) = unrolls(adder)
    assert u["obs"][:, 0].tolist() == [0, 1, 102, 3, 4]  # the reset step itself is no step
    assert u["terminated"].tolist() == [0, 1, 0, 0] and u["truncated"].tolist() == [0, 0, 0, 0]
    assert u["mask"].tolist() == [1, 1, 1, 1]


@pytest.mark.parametrize("mode", [NEXT, SAME])
def test_a_truncation_ends_the_unroll_padded_with_the_true_final_observation_to_bootstrap(mode) -> None:
    adder = UnrollAdder(1, 4, mode)
    feed = Feeder(adder, mode)
    feed.step()
    feed.step("trunc")  # final observation 2, not the reset 102
    for _ in range(4):
        feed.step()
    cut, whole = unrolls(adder)
    assert cut["mask"].tolist() == [1, 1, 0, 0] and cut["truncated"].tolist() == [0, 1, 0, 0]
    assert cut["obs"][:3, 0].tolist() == [0, 1, 2]  # obs[L] = the bootstrap observation
    assert cut["reward"].tolist() == [1, 1, 0, 0] and cut["action"].tolist() == [1, 2, 0, 0]
    assert whole["obs"][0, 0] == 102 and whole["mask"].tolist() == [1, 1, 1, 1]


def test_every_sub_env_keeps_its_own_unroll_and_take_stacks_them() -> None:
    adder = UnrollAdder(2, 2, NEXT)
    box = np.zeros((2, 3), np.float32)
    for t in range(2):
        obs = np.array([[t, 10 + t]], np.float32).T
        adder.add(obs, box + t, np.ones(2), obs + 1, np.zeros(2, bool), np.zeros(2, bool), {}, np.zeros(2), 7)
    assert adder.take(3) is None
    batch = adder.take(2)
    assert batch is not None and set(batch) == set(FIELDS)
    assert batch["obs"].shape == (2, 3, 1) and batch["action"].shape == (2, 2, 3)
    assert batch["action"].dtype == np.float32 and batch["version"].dtype == np.int64
    assert batch["obs"][:, :, 0].tolist() == [[0, 1, 2], [10, 11, 12]]
