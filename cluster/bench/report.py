"""The shape every benchmark's JSON shares: figures, in-run baselines, machine facts, checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from canopy.cluster.report import machine_facts


def check(name: str, value: Any, unit: str, goal: str, baseline: Any, met: bool) -> dict[str, Any]:
    """One entry of `checks`: a goal of the issue, the figure reached and the baseline beside it."""
    return {"name": name, "value": value, "unit": unit, "goal": goal, "baseline": baseline, "met": bool(met)}


def write(path: str | Path, bench: str, figures: dict[str, Any], checks: list[dict[str, Any]]) -> None:
    """The whole document to `path`; its checks alone on stdout, where every bench prints them."""
    doc = {"bench": bench, **figures, "machine": machine_facts(), "checks": checks}
    Path(path).write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps({"bench": bench, "checks": checks}, indent=2))
