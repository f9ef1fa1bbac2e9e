"""actors/evaluator.py: the confirmation rule, and judging a policy in one vector env."""

from __future__ import annotations

import numpy as np
import pytest

from canopy.actors.evaluator import earns_confirmation, improves, judge, summarize
from canopy.config import EnvConfig


@pytest.mark.parametrize(
    ("screen", "best", "confirm"),
    [
        pytest.param(20.0, None, True, id="first-version-is-always-confirmed"),
        pytest.param(480.0, 470.0, True, id="a-screen-above-the-best-is-confirmed"),
        pytest.param(470.0, 470.0, False, id="a-tie-is-not"),
        pytest.param(500.0, 500.0, False, id="at-the-ceiling-nothing-more-to-confirm"),
        pytest.param(300.0, 470.0, False, id="a-worse-screen-is-not"),
    ],
)
def test_a_version_is_confirmed_only_when_its_screen_may_beat_the_best(
    screen: float, best: float | None, confirm: bool
) -> None:
    assert earns_confirmation(screen, best) is confirm


def test_only_a_strictly_better_confirmed_score_replaces_the_best() -> None:
    assert improves(10.0, None)
    assert improves(480.5, 480.0)
    assert not improves(480.0, 480.0)  # ties keep the older, already handed-over version
    assert not improves(300.0, 480.0)


def test_summary_of_returns() -> None:
    assert summarize(np.array([1.0, 3.0])) == {"mean": 2.0, "std": 1.0, "min": 1.0, "max": 3.0, "episodes": 2}


def test_judge_plays_every_episode_on_its_own_seed_in_one_vector_env() -> None:
    # A "policy" that always pushes right: CartPole falls within a few dozen steps, and the
    # returns differ with the seeds, so 7 episodes are 7 distinct starts.
    arrays = {
        "layers.0.weight": np.zeros((2, 4), np.float32),
        "layers.0.bias": np.array([0.0, 1.0], np.float32),
    }
    score = judge("mlp", arrays, EnvConfig(id="CartPole-v1"), episodes=7, seed=123)
    again = judge("mlp", arrays, EnvConfig(id="CartPole-v1"), episodes=7, seed=123)
    other = judge("mlp", arrays, EnvConfig(id="CartPole-v1"), episodes=7, seed=999)
    assert score == again, "the same seeds give the same score"
    assert score["episodes"] == 7 and 5 <= score["mean"] <= 60
    assert score != other
