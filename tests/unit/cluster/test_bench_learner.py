"""cluster/bench/learner.py: the report shape, with a tiny timing window."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from canopy.cluster.bench import learner
from canopy.learner.network import NatureCNN


def test_the_nature_cnn_maps_stacked_uint8_frames_to_one_q_value_per_action() -> None:
    q = NatureCNN(4, 6)(torch.zeros(2, 4, 84, 84, dtype=torch.uint8))
    assert q.shape == (2, 6)


def test_the_bench_reports_each_workload_beside_its_bare_pytorch_baseline(tmp_path: Path) -> None:
    out = tmp_path / "learner.json"
    learner.main(argparse.Namespace(json=str(out), seconds=0.05, threads=1))
    doc = json.loads(out.read_text())
    assert set(doc["workloads"]) >= {"cartpole_mlp_cpu", "atari_nature_cnn_cpu"}
    for figures in doc["workloads"].values():
        assert figures["updates_per_s"] > 0 and figures["baseline_bare_pytorch_updates_per_s"] > 0
    names = [c["name"] for c in doc["checks"]]
    assert "multi-model overlap gain" in names and "machine" in doc
    overlap = doc["multi_model_overlap"]
    assert overlap["ranks"] == 2 and overlap["models"] == 4
    assert overlap["sequential_updates_per_s"] > 0 and overlap["overlapped_updates_per_s"] > 0
    gain = next(c for c in doc["checks"] if c["name"] == "multi-model overlap gain")
    assert gain["value"] == overlap["gain"] and gain["baseline"] == overlap["sequential_updates_per_s"]
