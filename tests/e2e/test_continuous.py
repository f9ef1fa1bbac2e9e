"""`canopy up` on a continuous-action env with defaults: TD3 (picked from the Box action space)
learns Pendulum to a confirmed solve, then the stopped run's
policy is exported and evaluated from its persisted Redis."""

from __future__ import annotations

import json

import pytest
from test_up import SOLVE_TIMEOUT_S, assert_all_gone, canopy_cli, canopy_up  # noqa: F401 (fixture)


@pytest.mark.slow
def test_td3_solves_pendulum_and_the_stopped_runs_policy_exports_and_evaluates(canopy_up) -> None:  # noqa: F811
    run = canopy_up("--env Pendulum-v1 --stop-at-return -200 --time-limit 150")  # td3 picked by itself
    code = run.wait(SOLVE_TIMEOUT_S)
    assert code == 0, f"exit {code}; stderr: {run.stderr_text()[-2000:]}"
    summary = json.loads((run.run_dir / "summary.json").read_text())
    assert summary["solved"] is True, f"Pendulum not solved in 150 s: {summary}"
    assert_all_gone(run.cluster())

    out = run.run_dir / "policy.pt"
    exported = canopy_cli("export", str(run.run_dir), "--out", str(out), "--format", "torchscript")
    assert exported.returncode == 0, exported.stderr
    assert out.stat().st_size > 0
    played = canopy_cli("eval", str(run.run_dir), "--episodes", "3")
    assert played.returncode == 0, played.stderr
    result = json.loads(played.stdout.strip().splitlines()[-1])
    assert result["env"] == "Pendulum-v1" and result["episodes"] == 3
    assert result["mean_return"] > -1000  # far above a random policy's ~ -1200
