"""`canopy up` with the on-policy learners: PPO and IMPALA reach a confirmed CartPole solve with
their own defaults (nothing but `learner.algorithm` set), the run reports its policy lag, and
the handed-over categorical policy plays as confirmed."""

from __future__ import annotations

import json

import pytest
from test_up import SOLVE_TIMEOUT_S, assert_all_gone, canopy_cli, canopy_up  # noqa: F401 (fixture)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["ppo", "impala"])
def test_an_on_policy_learner_solves_cartpole_with_its_defaults(canopy_up, algorithm: str) -> None:  # noqa: F811
    run = canopy_up(f'--stop-at-return 475 --time-limit 150 --set learner.algorithm="{algorithm}"')
    code = run.wait(SOLVE_TIMEOUT_S)
    assert code == 0, f"exit {code}; stderr: {run.stderr_text()[-2000:]}"
    summary = json.loads((run.run_dir / "summary.json").read_text())
    assert summary["solved"] is True, f"{algorithm} did not solve CartPole in 150 s: {summary}"
    assert summary["env_steps_to_solve"] > 0
    # Every item trained on was acted on by some version: the learner knows how far behind.
    lag = [summary[f"policy_lag_{q}"] for q in ("p50", "p90", "max")]
    assert None not in lag and 0 <= lag[0] <= lag[1] <= lag[2], lag
    assert_all_gone(run.cluster())
    played = canopy_cli("eval", str(run.run_dir), "--episodes", "20")
    assert played.returncode == 0, played.stderr
    result = json.loads(played.stdout.strip().splitlines()[-1])
    assert result["mean_return"] >= 400, result  # the pinned best, acting greedily
