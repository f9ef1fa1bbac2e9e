"""What `canopy up` shows while it runs: a rich progress bar on a terminal, plain lines otherwise.

The launcher hands over one progress line per metrics row; on a terminal it becomes the
description of a bar that fills towards `run.time_limit_s` (a pulsing bar without a limit),
and waits without a figure to show (start-up, the final evaluation) get a spinner. Without a
terminal (logs, CI) the line is printed every LOG_EVERY_S seconds and nothing else is drawn.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Column

LOG_EVERY_S = 5.0


class RunProgress:
    """A bar (or, without a terminal, periodic lines) for the run's progress lines.

    Example:
        progress = RunProgress(time_limit_s=120)
        progress.update(3.0, "3.0s  steps 1200 ...")
        progress.close()
    """

    def __init__(self, time_limit_s: float):
        self.console = Console(stderr=True)
        self.bar: Progress | None = None
        self.last_log = 0.0
        if self.console.is_terminal:
            # Bar first and narrow: the long line wraps below it on a small terminal instead
            # of being cut short.
            self.bar = Progress(
                TimeElapsedColumn(),
                BarColumn(bar_width=20),
                TextColumn("{task.description}", table_column=Column(no_wrap=False, ratio=1)),
                console=self.console,
                expand=True,
            )
            self.task = self.bar.add_task("starting", total=time_limit_s or None)
            self.bar.start()

    def update(self, wall_s: float, line: str) -> None:
        """Show `line`: with the bar at `wall_s` on a terminal, else printed every LOG_EVERY_S."""
        if self.bar is not None:
            self.bar.update(self.task, description=line, completed=wall_s)
        elif time.monotonic() - self.last_log >= LOG_EVERY_S:
            print(line, file=sys.stderr, flush=True)
            self.last_log = time.monotonic()

    def close(self) -> None:
        """Stop the bar (nothing to do without a terminal)."""
        if self.bar is not None:
            self.bar.stop()


@contextlib.contextmanager
def waiting(what: str) -> Iterator[None]:
    """A spinner saying `what` while the block runs, on a terminal only."""
    console = Console(stderr=True)
    if not console.is_terminal:
        yield
        return
    with console.status(what):
        yield
