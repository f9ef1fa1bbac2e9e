"""What one injected fault did to a run, and the table `canopy bench faults` prints of them.

Place: shared by the two kinds of fault of the fault matrix, the kills on a live `canopy up`
(faults.py) and the network cut-offs on namespace hosts (cutoff.py), so that neither
imports the other for it; faults.py reports both kinds with `Outcome.ok` as each check.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.table import Table

RECOVER_TIMEOUT_S = 60.0  # longest wait for any one sign of recovery
ACTOR_STEPS = 500  # env steps every actor must take after recovery


@dataclass
class Outcome:
    """What one fault did to the run; `ok` is the check the JSON reports."""

    fault: str
    target: str
    goal_s: float
    detect_s: float | None = None
    detected_by: str = ""
    recover_s: float | None = None
    recovered_by: str = ""
    version_before: str = ""
    version_after: str = ""
    versions_increasing: bool = False
    eval_before: float | None = None
    eval_after: float | None = None
    checkpoints_checked: int = 0
    checkpoints_lost: list[str] = field(default_factory=list)
    fenced: bool | None = None  # zombie only: it stopped after waking
    zombie_writes: list[str] = field(default_factory=list)  # zombie only: versions/ckpts after SIGCONT
    # takeover/cold only: seconds from the kill to each step of the restart, as the run recorded them
    phases: dict[str, float] = field(default_factory=dict)
    error: str = ""

    @property
    def eval_collapsed(self) -> bool:
        """A policy that was worth keeping (return >= 100) lost more than half of its return:
        no screen in the EVAL_WAIT_S after recovery reached half of the last one before."""
        if self.eval_before is None or self.eval_before < 100:
            return False
        return self.eval_after is None or self.eval_after < 0.5 * self.eval_before

    @property
    def ok(self) -> bool:
        """Detected, recovered in time, training went on, nothing lost, nothing written by a zombie."""
        return (
            not self.error
            and self.detect_s is not None
            and self.recover_s is not None
            and self.recover_s <= self.goal_s
            and self.versions_increasing
            and not self.checkpoints_lost
            and not self.eval_collapsed
            and self.fenced is not False
            and not self.zombie_writes
        )


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def table(outcomes: list[Outcome], baseline_s: float | None) -> Table:
    """One row per fault, beside the run's normal gap between versions."""
    t = Table(title=f"fault matrix (normal gap between versions: {_fmt(baseline_s)} s)")
    for col in (
        "fault",
        "target",
        "detect s",
        "by",
        "recover s",
        "goal s",
        "versions",
        "eval",
        "ckpts",
        "ok",
    ):
        t.add_column(col)
    for o in outcomes:
        extra = "" if o.fenced is None else (" fenced" if o.fenced else " NOT fenced")
        t.add_row(
            o.fault,
            o.target + extra,
            _fmt(o.detect_s),
            o.detected_by,
            _fmt(o.recover_s),
            f"{o.goal_s:g}",
            f"{o.version_before} -> {o.version_after or '?'}",
            f"{_fmt(o.eval_before)} -> {_fmt(o.eval_after)}",
            f"{o.checkpoints_checked - len(o.checkpoints_lost)}/{o.checkpoints_checked}",
            "yes" if o.ok else f"NO {o.error[:60]}",
        )
    return t
