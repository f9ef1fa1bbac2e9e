"""cluster/bench/soak.py, CI-sized: a real canopy up under simulated actors for a few seconds."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from canopy.cluster.bench import soak


@pytest.mark.slow
def test_a_short_soak_reports_throughput_and_every_roles_rss_without_errors(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    soak.main(argparse.Namespace(json=str(out), actors=20, minutes=0.25, processes=2, period=0.5))
    doc = json.loads(out.read_text())
    checks = {c["name"]: c for c in doc["checks"]}
    assert checks["errors"]["value"] == 0
    assert checks["learner keeps training"]["met"]
    assert doc["inserts_total"] > 0 and doc["versions_received_total"] > 0
    roles = doc["series"][-1]["rss_bytes"]
    assert {"redis-0", "replay-0", "cache-0", "learner-0", "actor-0"} <= set(roles)
    assert all(v and v > 0 for v in roles.values())
