"""cluster/tboard.py: metrics rows become TensorBoard scalars, read back with TensorBoard itself."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from canopy.cluster import tboard

ROWS = [
    {"wall_s": 1.0, "env_steps": 100, "train_return": None, "updates": 0, "version": "1.0", "solved": False},
    {"wall_s": 2.0, "env_steps": 300, "train_return": 21.5, "updates": 40, "version": "1.40"},
]


def test_every_numeric_field_of_a_row_is_a_scalar_stepped_by_env_steps(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="tensorboard not installed (optional extra)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = tboard.open_log(tmp_path, started_at=1_000.0)
    assert log is not None
    for row in ROWS:
        log.write(row)
    log.close()

    events = EventAccumulator(str(tmp_path / tboard.TB_DIR))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"wall_s", "env_steps", "train_return", "updates"}
    returns = events.Scalars("train_return")
    assert [(e.step, e.value, e.wall_time) for e in returns] == [(300, 21.5, 1_002.0)]
    assert [(e.step, e.value) for e in events.Scalars("updates")] == [(100, 0.0), (300, 40.0)]


def test_without_tensorboard_there_is_no_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(
        sys.modules, "tensorboard.summary.writer.event_file_writer", None
    )  # import now raises ImportError
    assert tboard.open_log(tmp_path, started_at=0.0) is None
    assert not (tmp_path / tboard.TB_DIR).exists()
