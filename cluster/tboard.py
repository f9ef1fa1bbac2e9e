"""TensorBoard scalars of a run: every numeric field of each metrics.jsonl row, under RUN_DIR/tb.

The launcher hands each row it appends to metrics.jsonl to `ScalarLog.write` as well, so
TensorBoard and `canopy plot` show the same numbers. Optional: without the `tensorboard`
package (`pip install 'canopy-rl[tensorboard]'`) `open_log` returns None and nothing else
changes. Scalars are stepped by env steps (the x axis RL curves use) and stamped with the
row's wall time, so TensorBoard's "relative" axis shows time since the start of the run.

Example:
    log = open_log(run_dir, started_at=time.time())
    if log is not None:
        log.write({"wall_s": 1.0, "env_steps": 512, "train_return": 21.5, "version": "1.50"})
        log.close()
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TB_DIR = "tb"
STEP_FIELD = "env_steps"


class ScalarLog:
    """Writes metrics rows as TensorBoard scalars (tag = the row's field name) under `log_dir`.

    Uses tensorboard's own event writer (the one torch's SummaryWriter wraps), so the
    launcher need not import torch; raises ImportError when tensorboard is missing.
    """

    def __init__(self, log_dir: Path, started_at: float):
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self.event, self.summary = Event, Summary
        self.writer = EventFileWriter(str(log_dir))
        self.started_at = started_at

    def write(self, row: dict[str, Any]) -> None:
        """One metrics row as scalars at its env step; fields that are not numbers are skipped."""
        values = [
            self.summary.Value(tag=name, simple_value=float(value))
            for name, value in row.items()
            # Versions are strings and absent figures are None: neither is a scalar.
            if isinstance(value, int | float) and not isinstance(value, bool)
        ]
        self.writer.add_event(
            self.event(
                wall_time=self.started_at + float(row.get("wall_s") or 0.0),
                step=int(row.get(STEP_FIELD) or 0),
                summary=self.summary(value=values),
            )
        )
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()


def open_log(run_dir: Path, started_at: float) -> ScalarLog | None:
    """A ScalarLog writing to `run_dir`/tb, or None when tensorboard is not installed."""
    try:
        return ScalarLog(Path(run_dir) / TB_DIR, started_at)
    except ImportError:
        return None
