"""cluster/plot.py: a PNG from metrics.jsonl, with the solve point that summary.json reports."""

from __future__ import annotations

import json
from pathlib import Path

from canopy.cluster.plot import load_solve, plot

ROW = {"env_steps": 0, "wall_s": 0.0, "train_return": None, "eval_return": None, "updates": 0}


def write_run(run_dir: Path, summary: object) -> None:
    run_dir.mkdir()
    rows = [{**ROW, "env_steps": 1000 * i, "wall_s": float(i), "updates": 10 * i} for i in range(8)]
    rows[-1].update(train_return=200.0, eval_return=300.0)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"cut sho')
    (run_dir / "summary.json").write_text(json.dumps(summary))


def test_a_solved_run_is_plotted_with_its_solve_point(tmp_path: Path) -> None:
    solved = {"solved": True, "env_steps_to_solve": 7500, "time_to_solve_s": 7.5, "solve_eval_return": 480.0}
    write_run(tmp_path / "a", solved)
    write_run(tmp_path / "b", {"solved": False})
    assert load_solve(tmp_path / "a") == {k: v for k, v in solved.items() if k != "solved"}
    assert load_solve(tmp_path / "b") is None
    out = plot([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "curves.png"))
    assert out.read_bytes().startswith(b"\x89PNG")


def test_a_garbled_summary_only_loses_the_solve_point(tmp_path: Path) -> None:
    write_run(tmp_path / "a", {"solved": True, "env_steps_to_solve": "many", "time_to_solve_s": 1.0})
    assert load_solve(tmp_path / "a") is None
    (tmp_path / "a" / "summary.json").write_text("[1, 2")
    assert load_solve(tmp_path / "a") is None
