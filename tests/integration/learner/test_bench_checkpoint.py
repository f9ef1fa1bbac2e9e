"""`canopy bench checkpoint` end to end with tiny sizes: real shards, learners, SIGKILL; JSON shape."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT

pytestmark = pytest.mark.slow
CHECKS = {
    "step_time_overhead",
    "training_thread_stall_per_checkpoint",
    "recovery_cold",
    "recovery_warm_standby",
}


def test_bench_checkpoint_writes_every_figure_and_one_check_per_goal(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        "-m",
        "canopy.cluster.cli",
        "bench",
        "checkpoint",
        "--state-mb",
        "2",
        "--duration",
        "3",
    ]
    cmd += ["--period", "1", "--recovery-trials", "1", "--baseline-trials", "1", "--json", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=REPO_ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["bench"] == "checkpoint" and doc["machine"]["cpus"] >= 1
    assert {c["name"] for c in doc["checks"]} == CHECKS
    for c in doc["checks"]:
        assert set(c) == {"name", "value", "unit", "goal", "baseline", "met"}
        assert isinstance(c["value"], int | float) and isinstance(c["met"], bool)
        assert c["baseline"] is not None
    assert doc["checkpoints"] >= 2 and doc["commit_ms"]["n"] >= 2 and doc["commit_failures"] == []
    assert doc["config"]["replicas"] == 2 and abs(doc["config"]["state_bytes"] / 2**20 - 2) < 0.2
    for kind in ("recovery_cold", "recovery_warm"):
        (trial,) = doc[kind]
        assert trial["restored"] is not None and trial["seconds"] > 0
    assert doc["baseline_torch_save_fsync"]["blocking_ms"]["n"] == 1


def test_bench_checkpoint_with_tls_sets_the_tls_pass_beside_the_plaintext_one(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "canopy.cluster.cli", "bench", "checkpoint", "--tls", "--state-mb", "2"]
    cmd += ["--duration", "3", "--period", "1", "--no-recovery", "--no-dcp", "--baseline-trials", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(
        [*cmd, "--json", str(out)], capture_output=True, text=True, timeout=240, cwd=REPO_ROOT, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    cost = json.loads(out.read_text())["tls_cost"]
    for figure in ("commit_ms_p50", "write_ms_p50", "stall_ms_p50"):
        assert cost[figure]["plaintext"] > 0 and cost[figure]["tls"] > 0, figure
        assert cost[figure]["ratio"] == pytest.approx(
            cost[figure]["tls"] / cost[figure]["plaintext"], rel=0.01
        )
    assert cost["recovery_cold_s"] == {"plaintext": None, "tls": None, "ratio": None}  # --no-recovery
    assert '"tls_cost"' in proc.stdout
