"""`canopy bench broadcast` on its small fast path: every arm completes across real
processes and the JSON holds each figure, its baselines and the checks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT

from canopy.cluster import netns

BENCH_TIMEOUT_S = 120


@pytest.mark.slow
def test_broadcast_bench_measures_the_tree_and_every_baseline_on_100_actors(tmp_path: Path) -> None:
    out = tmp_path / "bc.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "canopy.cluster.cli",
            "bench",
            "broadcast",
            "--actors",
            "100",
            "--model-mb",
            "1",
            "--hosts",
            "2",
            "--versions",
            "2",
            "--json",
            str(out),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=BENCH_TIMEOUT_S,
    )
    assert out.exists(), done.stderr[-2000:]
    doc = json.loads(out.read_text())
    for arm in ("tree", "tree_direct", "flat", "pub"):
        fig = doc[arm]
        assert fig["actors_ready"] == fig["actors"] == 100, arm
        assert 0 < fig["p50_s"] <= fig["p99_s"] <= fig["max_s"] < 60, arm
        assert fig["cpu_s_per_version"] > 0
    tree = doc["tree"]
    # Every actor acts on its host's one shared copy: no model bytes leave the leaves.
    assert tree["actors_on_shared_copy"] == 100
    assert tree["bytes_per_version"]["leaf_sent_over_sockets"] == 0
    assert tree["bytes_per_version"]["redis_root"] == doc["model_bytes"]  # one tier-1 node
    assert all(v["leaf_landed_s"] >= v["tier1_landed_s"] > 0 for v in tree["versions"])
    assert doc["flat"]["extrapolated"] is False and "limited_by" not in doc["pub"]
    assert doc["lower_bound"]["p99_s"] > 0 and doc["planner"]["inputs"]["hosts"] == 2
    checks = {c["name"]: c for c in doc["checks"]}
    assert set(checks["Redis root bytes per version"]) == {"name", "value", "unit", "goal", "baseline", "met"}
    assert checks["Redis root bytes per version"]["met"] and checks["int8delta bytes vs raw"]["met"]
    assert checks["every actor ready each version, on its host's shared copy"]["met"]


@pytest.mark.slow
def test_broadcast_bench_with_tls_runs_the_redis_arms_again_over_tls(tmp_path: Path) -> None:
    out = tmp_path / "bc.json"
    cmd = [sys.executable, "-m", "canopy.cluster.cli", "bench", "broadcast", "--tls", "--actors", "20"]
    cmd += ["--model-mb", "1", "--hosts", "2", "--versions", "2", "--json", str(out)]
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=BENCH_TIMEOUT_S)
    assert out.exists(), done.stderr[-2000:]
    doc = json.loads(out.read_text())
    for arm in ("tree", "flat"):
        assert doc["tls"][arm]["actors_ready"] == doc["tls"][arm]["actors"] == 20, arm
        p50 = doc["tls_cost"][arm]["p50_s"]
        assert p50["plaintext"] == doc[arm]["p50_s"] and p50["tls"] == doc["tls"][arm]["p50_s"] > 0
        assert p50["ratio"] == pytest.approx(p50["tls"] / p50["plaintext"], rel=0.01)
    assert doc["tls"]["tree"]["bytes_per_version"]["redis_root"] == doc["model_bytes"]


@pytest.mark.slow
def test_broadcast_bench_runs_each_host_in_its_own_network_namespace(tmp_path: Path) -> None:
    reason = netns.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    out = tmp_path / "bc.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "canopy.cluster.cli",
            "bench",
            "broadcast",
            "--actors",
            "40",
            "--model-mb",
            "1",
            "--hosts",
            "2",
            "--versions",
            "1",
            "--netns",
            "--rate-mbit",
            "2000",
            "--json",
            str(out),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=BENCH_TIMEOUT_S,
    )
    assert out.exists(), done.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["netns"] == {"hosts": ["root", "h0", "h1"], "rate_mbit": 2000.0}
    # Leaves and actors share a namespace (a host): they still take the shared-memory path.
    assert doc["tree"]["actors_on_shared_copy"] == doc["tree"]["actors_ready"] == 40
    assert doc["tree"]["bytes_per_version"]["tier1_sent"] == 2 * doc["model_bytes"]  # one per host
    assert doc["flat"]["actors_ready"] == doc["pub"]["actors_ready"] == 40
