"""`canopy up` with r2d2 on canopy/CartPoleNoVelocity-v1 (nothing set but the algorithm): the
learner trains on replayed sequences, publishes lstm_q versions that actors and the evaluator
act with, and `canopy eval` plays the newest one. A full solve (>= 400) takes minutes on a
small machine: docs/algorithms.md has the figures; this run is short."""

from __future__ import annotations

import json

import pytest
from test_up import assert_all_gone, canopy_cli, canopy_up  # noqa: F401 (fixture)

ENV = "canopy/CartPoleNoVelocity-v1"


@pytest.mark.slow
def test_r2d2_trains_on_the_partially_observed_cartpole_and_publishes(canopy_up) -> None:  # noqa: F811
    run = canopy_up(f'--env {ENV} --time-limit 50 --set learner.algorithm="r2d2"')
    code = run.wait(180)
    assert code == 0, f"exit {code}; stderr: {run.stderr_text()[-2000:]}"
    summary = json.loads((run.run_dir / "summary.json").read_text())
    assert summary["env_id"] == ENV and summary["stop_reason"] == "time_limit"
    assert summary["updates"] > 0 and summary["versions_published"] > 0, summary
    # Sequences carry the version that acted: the learner reports how far behind they are.
    assert summary["policy_lag_p50"] is not None, summary
    assert summary["newest_episodes"] == 100 and summary["newest_return_mean"] > 0, summary
    assert_all_gone(run.cluster())
    played = canopy_cli("eval", str(run.run_dir), "--version", "newest", "--episodes", "5")
    assert played.returncode == 0, played.stderr
    result = json.loads(played.stdout.strip().splitlines()[-1])
    assert result["env"] == ENV and result["mean_return"] > 0, result
