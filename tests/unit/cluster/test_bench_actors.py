"""cluster/bench/actors.py: the report shape, with a tiny timing window."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from canopy.cluster.bench import actors


def test_the_bench_reports_acting_speed_beside_random_stepping(tmp_path: Path) -> None:
    out = tmp_path / "actors.json"
    actors.main(argparse.Namespace(json=str(out), seconds=0.1, envs=[4]))
    doc = json.loads(out.read_text())
    figures = doc["workloads"]["CartPole-v1_x4"]
    assert figures["env_steps_per_s"] > 0 and figures["baseline_random_vector_env_steps_per_s"] > 0
    assert doc["checks"][0]["baseline"] == figures["baseline_random_vector_env_steps_per_s"]
