"""cluster/bench/soak.py, CI-sized: a real canopy up under simulated actors for about a minute."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from canopy.cluster.bench import soak

KEEP_LEDGER = 16


@pytest.mark.slow
def test_a_short_soak_reports_throughput_rss_and_redis_memory_and_keeps_the_ledger_bounded(
    tmp_path: Path,
) -> None:
    out = tmp_path / "soak.json"
    soak.main(
        argparse.Namespace(
            json=str(out),
            actors=20,
            minutes=1.0,
            processes=2,
            period=0.5,
            set=[f"learner.keep_ledger={KEEP_LEDGER}"],
        )
    )
    doc = json.loads(out.read_text())
    checks = {c["name"]: c for c in doc["checks"]}
    assert checks["errors"]["value"] == 0
    assert checks["learner keeps training"]["met"]
    assert doc["inserts_total"] > 0 and doc["versions_received_total"] > 0
    last = doc["series"][-1]
    roles = last["rss_bytes"]
    assert {"redis-0", "replay-0", "cache-0", "learner-0", "actor-0"} <= set(roles)
    assert all(v and v > 0 for v in roles.values())

    # Many more versions than the ledger keeps, and never more entries than it keeps.
    assert doc["keep_ledger"] == KEEP_LEDGER and doc["versions_published"] > 3 * KEEP_LEDGER
    assert checks["ledger entries bounded"]["met"], checks["ledger entries bounded"]
    assert all(row["ledger_entries"] <= KEEP_LEDGER for row in doc["series"])
    assert doc["ledger_full_at_s"] is not None and doc["warmup_end_s"] >= doc["ledger_full_at_s"]
    shards = set(last["redis_used_memory"])
    assert shards == {"redis-0", "redis-1"} and all(v > 0 for v in last["redis_used_memory"].values())
    assert {f"Redis used_memory flat after warm-up: {s}" for s in shards} <= set(checks)
