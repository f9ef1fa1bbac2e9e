"""What the benches under cluster/bench share, so each bench file is its measurement alone.

Place: below every bench, above the roles it drives. It starts, watches and stops the
processes a bench runs (a `canopy up`, role processes, redis-server, spawned workers), reads
their facts from /proc, waits for Redis, reads a run's records, makes scratch run
directories, sums up timings, and draws the progress bar. The JSON each bench writes (its
figures, machine facts and `checks`) is report.py.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import multiprocessing.process
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import redis
from rich.console import Console
from rich.progress import Progress

from canopy import lifecycle
from canopy.errors import DeadlineExceeded, UserError
from canopy.keys import Keys
from canopy.lifecycle import wait_until
from canopy.version import Version

PROGRESS_EVERY_S = 1.0  # `watch` calls its on_tick this often


# ---- command lines ---------------------------------------------------------------------
def canopy(*args: str) -> list[str]:
    """`canopy ARGS` as this interpreter runs it, so a bench drives the checkout it runs from."""
    return [sys.executable, "-m", "canopy.cluster.cli", *args]


def up_command(
    env_id: str,
    run_dir: Path,
    *,
    seed: int | None = None,
    stop_at_return: str | float | None = None,
    time_limit: float | None = None,
    sets: list[str] | tuple[str, ...] = (),
) -> list[str]:
    """`canopy up --env ENV [--seed S] [--stop-at-return R] [--time-limit T] --run-dir DIR [--set ...]`."""
    cmd = canopy("up", "--env", env_id)
    if seed is not None:
        cmd += ["--seed", str(seed)]
    if stop_at_return is not None:
        cmd += ["--stop-at-return", str(stop_at_return)]
    if time_limit is not None:
        cmd += ["--time-limit", str(time_limit)]
    cmd += ["--run-dir", str(run_dir)]
    for item in sets:
        cmd += ["--set", item]
    return cmd


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment for a role process that must die with the bench."""
    return {**os.environ, "CANOPY_PARENT_PID": str(os.getpid()), "PYTHONUNBUFFERED": "1", **extra}


def die_with_parent() -> None:
    """A Popen preexec_fn: the kernel kills the child when the bench dies, even by SIGKILL."""
    ctypes.CDLL(None).prctl(lifecycle.PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


# ---- stopping --------------------------------------------------------------------------
def stop(procs: list[subprocess.Popen], timeout_s: float = 10.0) -> list[subprocess.Popen]:
    """SIGTERM every one still running, SIGKILL those not gone within `timeout_s` (all
    together); returns the ones that had to be killed."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + timeout_s
    killed = []
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            killed.append(p)
            p.kill()
            p.wait(timeout=10)
    return killed


def join(procs: list[multiprocessing.process.BaseProcess | None], timeout_s: float = 5.0) -> None:
    """Join spawned workers (None: never started); kill the ones still alive after `timeout_s` each."""
    for p in procs:
        if p is None:
            continue
        p.join(timeout=timeout_s)
        if p.is_alive():
            p.kill()
            p.join(timeout=timeout_s)


# ---- watching --------------------------------------------------------------------------
def readline(p: subprocess.Popen, timeout: float) -> str:
    """The next line of a child's stdout; TimeoutError when it stays silent, RuntimeError at exit."""
    poll = select.poll()  # not select(): a bench may hold thousands of descriptors
    poll.register(p.stdout, select.POLLIN)
    if not poll.poll(timeout * 1000):
        raise TimeoutError(f"process {p.args[:4]} said nothing within {timeout:g}s")
    line = p.stdout.readline()
    if not line:
        raise RuntimeError(f"process {p.args[:4]} exited with {p.wait()} (see its stderr above)")
    return line


def watch(cmd: list[str], stdout: Any, stderr: Any, timeout_s: float, on_tick: Callable[[], None]) -> int:
    """Run `cmd` to its end, calling `on_tick` about every second; kill it past `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr)
    try:
        while proc.poll() is None:
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(cmd, timeout_s)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=PROGRESS_EVERY_S)
            on_tick()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode


def wait_started(up: subprocess.Popen, run_dir: Path, timeout_s: float, tail: Callable[[], str]) -> dict:
    """cluster.json of a starting `canopy up` once it is written; a UserError ending in
    `tail()` (what its stderr said) when the launcher exits or is not up in `timeout_s`."""
    cluster_json = run_dir / "cluster.json"
    try:
        wait_until(lambda: cluster_json.exists() or up.poll() is not None, timeout_s, "cluster.json")
    except DeadlineExceeded:
        raise UserError(f"canopy up did not start in {timeout_s:.0f}s: {tail()}") from None
    if up.poll() is not None:
        raise UserError(f"canopy up exited with code {up.returncode}: {tail()}")
    return json.loads(cluster_json.read_text())


def last_lines(path: Path, n: int = 1) -> list[str]:
    """The last `n` lines of a subprocess's stderr file: what it died of."""
    try:
        return path.read_text(errors="replace").strip().splitlines()[-n:]
    except OSError:
        return []


def read_jsonl(path: Path) -> list[dict[str, Any]] | None:
    """Rows of a JSON-lines file; None when it is missing, lines cut short by a crash skipped."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def latest_row(run_dir: Path) -> str:
    """The newest metrics.jsonl row of a running `canopy up`, in a few words."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        row = json.loads(lines[-1]) if lines else None
    except (OSError, ValueError):
        row = None
    if not isinstance(row, dict):
        return "starting"
    evaluation = row.get("eval_return")
    shown = "-" if evaluation is None else f"{evaluation:.0f}"
    return f"{row.get('wall_s', 0):.0f}s, {row.get('env_steps', 0):,} steps, eval {shown}"


# ---- /proc -----------------------------------------------------------------------------
def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state first), None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()
    except OSError:
        return None


def alive(pid: int) -> bool:
    """`pid` exists and is not a zombie."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def same_process(pid: int, start: str) -> bool:
    """`pid` is still the process first seen with start time `start`, and not a zombie."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z" and fields[19] == start


def descendants(root: int) -> dict[int, str]:
    """Every live descendant of `root` with its start time (field 22 of /proc/<pid>/stat)."""
    parent: dict[int, int] = {}
    start: dict[int, str] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) is not None:
            parent[int(entry.name)], start[int(entry.name)] = int(fields[1]), fields[19]
    found: dict[int, str] = {}
    frontier = [root]
    while frontier:
        p = frontier.pop()
        for child, ppid in parent.items():
            if ppid == p and child not in found:
                found[child] = start[child]
                frontier.append(child)
    return found


def cmdline(pid: int) -> str:
    """A process's command line, arguments joined by spaces ("" once it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of the live processes among `pids`."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        fields = _stat(pid)
        if fields is not None and len(fields) > 12:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def rss_bytes(pid: int) -> int | None:
    """Resident set size of `pid`; None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(x.split()[1]) * 1024 for x in f if x.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return None


def available_memory() -> int:
    """MemAvailable in bytes: what a bench may still fill on this shared machine."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


# ---- Redis -----------------------------------------------------------------------------
def wait_redis(r: redis.Redis, timeout_s: float) -> None:
    """Until the server behind `r` answers PING."""

    def pings() -> bool:
        try:
            return bool(r.ping())
        except redis.ConnectionError:
            return False

    wait_until(pings, timeout_s, "a redis server to answer", 0.05)


def latest_version(r: redis.Redis, keys: Keys) -> Version | None:
    """`model:latest`; None before the first publish or while the shard is down."""
    try:
        raw = r.get(keys.model_latest)
    except redis.RedisError:
        return None
    return Version.parse(raw) if raw else None


def read_events(
    r: redis.Redis, keys: Keys, kind: str | None = None, since: float = 0.0
) -> list[tuple[float, dict]]:
    """(wall time, event) of the run's event stream at or after `since`, of one `kind` or all;
    empty while the shard is down. The time is the entry id's."""
    try:
        entries = r.xrange(keys.events, min=f"{int(since * 1000)}-0")
    except redis.RedisError:
        return []
    out = []
    for entry_id, fields in entries:
        event = {k.decode(): v.decode() for k, v in fields.items()}
        if kind is None or event.get("kind") == kind:
            out.append((int(entry_id.decode().partition("-")[0]) / 1000, event))
    return out


# ---- figures ---------------------------------------------------------------------------
def tls_cost(plain: dict[str, float | None], tls: dict[str, float | None]) -> dict[str, dict[str, Any]]:
    """Figure by figure, a plaintext pass beside the same pass over TLS and their ratio (TLS / plaintext)."""
    return {
        k: {
            "plaintext": a,
            "tls": tls[k],
            "ratio": round(tls[k] / a, 3) if a and tls[k] is not None else None,
        }
        for k, a in plain.items()
    }


def ms_summary(seconds: list[float]) -> dict[str, float | None]:
    """n, mean, p50, p99 and max of durations, in milliseconds (nearest-rank percentiles)."""
    if not seconds:
        return {"n": 0, "mean": None, "p50": None, "p99": None, "max": None}
    s = sorted(seconds)
    return {
        "n": len(s),
        "mean": round(1000 * statistics.fmean(s), 3),
        "p50": round(1000 * s[len(s) // 2], 3),
        "p99": round(1000 * s[min(len(s) - 1, int(0.99 * len(s)))], 3),
        "max": round(1000 * s[-1], 3),
    }


def round_or_none(x: float | None, nd: int = 3) -> float | None:
    """`x` rounded to `nd` digits; None stays None."""
    return None if x is None else round(x, nd)


# ---- scratch directories and progress ----------------------------------------------------
@contextlib.contextmanager
def scratch_dir(prefix: str, parent: str | None = None, keep_on_error: bool = False) -> Iterator[Path]:
    """A fresh directory, removed afterwards; with `keep_on_error` it stays for a failed run
    so its logs can be read."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield path
    except BaseException:
        if not keep_on_error:
            shutil.rmtree(path, ignore_errors=True)
        raise
    shutil.rmtree(path, ignore_errors=True)


def progress(transient: bool = True) -> Progress:
    """The progress bar of a bench, on stderr: stdout carries the checks JSON alone."""
    return Progress(console=Console(stderr=True), transient=transient)
