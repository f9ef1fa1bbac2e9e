"""cluster/bench/learner.py: the report shape, with a tiny timing window."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from cluster.bench import learner
from learner.network import NatureCNN


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
