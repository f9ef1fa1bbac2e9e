"""Replay shard snapshots on local disk: written by a forked child, restored at start.

Place in the data flow: replay/server.py calls `Snapshotter.start` every
`replay.snapshot_interval_s`, on a `snapshot` request and when it stops; at start it
loads the newest valid snapshot with `load_newest`. Files live under
`<replay.snapshot_dir>/shard-<id>/snap-<seq>/`: one `.npy` per array (np.save,
allow_pickle=False) and `manifest.json` (format, seq, the shard's JSON state, and per
array its file, dtype, shape and xxh3-64 checksum), written last. `request` is the client
side: it asks a running shard for a snapshot now.

Why fork (as Redis BGSAVE does): the child gets a copy-on-write image of every table at
one instant between two requests, so the serving loop pauses only for fork() itself
(page-table copy, reported as `snapshot_pause_ms`) while the child writes gigabytes.
The child touches no ZeroMQ socket, no Redis connection and no Python-level lock
(it reports failures with os.write on fd 2, never through sys.stderr), runs no cyclic
garbage collection, closes nothing and leaves with os._exit; the parent only reaps it
with waitpid(WNOHANG). Memory cost: pages the parent writes while the child runs are
copied, at most the size of the tables. Large numpy arrays sit on transparent huge pages
(numpy's madvise; THP "madvise" or "always"), which keeps fork() short: on the shared
2-core test machine about 3 ms with 0.75 GB of tables, 6-10 ms with 2 GB.

Atomicity: the child writes into `.tmp-<seq>-<pid>/`, fsyncs every file, renames the
directory to `snap-<seq>` and fsyncs the parent directory, so a crash leaves either the
whole snapshot or none under the final name. A damaged one (checksum, shape, missing
file) is rejected at load with one log line and the previous one is used. The newest
`KEEP` snapshots are kept.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from canopy.errors import ProtocolError, UserError
from canopy.replay import connect, protocol

FORMAT = 1
KEEP = 2
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 64 * 2**20
PREFIX = "snap-"

Groups = dict[str, dict[str, np.ndarray]]  # e.g. table name -> array name -> array


class SnapshotError(Exception):
    """A snapshot on disk that cannot be used (torn, damaged, or of another format)."""


def shard_dir(root: str | Path, shard: int) -> Path:
    """Where shard `shard`'s snapshots live under `root`."""
    return Path(root) / f"shard-{shard}"


def _checksum(a: np.ndarray) -> str:
    return xxhash.xxh3_64_hexdigest(np.ascontiguousarray(a).data)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write(directory: Path, seq: int, state: dict, groups: Groups) -> Path:
    """Write one complete snapshot and rename it into place; returns its path."""
    tmp = directory / f".tmp-{seq:012d}-{os.getpid()}"
    tmp.mkdir(parents=True)
    files: dict[str, dict[str, dict]] = {}
    count = 0
    for group, arrays in groups.items():
        files[group] = {}
        for name, a in arrays.items():
            fname = f"{count:05d}.npy"
            count += 1
            with open(tmp / fname, "wb") as f:
                np.save(f, a, allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
            files[group][name] = {
                "file": fname,
                "dtype": a.dtype.str,
                "shape": list(a.shape),
                "xxh3": _checksum(a),
            }
    manifest = {"format": FORMAT, "seq": seq, "created_at": time.time(), "state": state, "arrays": files}
    with open(tmp / MANIFEST, "w") as f:
        json.dump(manifest, f)
        f.flush()
        os.fsync(f.fileno())
    final = directory / f"{PREFIX}{seq:012d}"
    os.rename(tmp, final)
    _fsync_dir(directory)
    _prune(directory)
    return final


def _prune(directory: Path) -> None:
    """Keep the newest KEEP snapshots; drop the leftovers of writers that died."""
    for old in snapshots(directory)[KEEP:]:
        shutil.rmtree(old, ignore_errors=True)
    for tmp in directory.glob(".tmp-*"):
        if not _pid_alive(int(tmp.name.rsplit("-", 1)[1])):
            shutil.rmtree(tmp, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def snapshots(directory: Path) -> list[Path]:
    """Snapshot directories under `directory`, newest first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]), reverse=True)


def read(path: Path) -> tuple[dict, Groups]:
    """(state, groups) of one snapshot; SnapshotError says what is wrong with it."""
    try:
        raw = (path / MANIFEST).read_bytes()[: MAX_MANIFEST_BYTES + 1]
    except OSError as exc:
        raise SnapshotError(f"no readable {MANIFEST} ({exc.strerror})") from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise SnapshotError(f"{MANIFEST} is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        manifest = json.loads(raw)
    except ValueError:
        raise SnapshotError(f"{MANIFEST} is not valid JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SnapshotError(f"{MANIFEST} is not format {FORMAT}")
    groups: Groups = {}
    try:
        for group, entries in manifest["arrays"].items():
            groups[group] = {}
            for name, entry in entries.items():
                groups[group][name] = _read_array(path, name, entry)
        return manifest["state"], groups
    except (KeyError, TypeError, AttributeError) as exc:
        raise SnapshotError(f"{MANIFEST} lacks a field ({type(exc).__name__}: {exc})") from None


def _read_array(path: Path, name: str, entry: dict) -> np.ndarray:
    fname = entry["file"]
    if not isinstance(fname, str) or "/" in fname or fname.startswith("."):
        raise SnapshotError(f"array {name!r} names a bad file {fname!r}")
    try:  # mapped, not read: a restore copies each array once, into its table
        a = np.load(path / fname, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise SnapshotError(f"array {name!r} ({fname}) cannot be read: {exc}") from None
    if a.dtype.str != entry["dtype"] or list(a.shape) != entry["shape"]:
        raise SnapshotError(f"array {name!r} ({fname}) is {a.dtype.str} {list(a.shape)}, not as listed")
    if _checksum(a) != entry["xxh3"]:
        raise SnapshotError(f"array {name!r} ({fname}) fails its xxh3 checksum")
    return a


def load_newest(
    directory: Path, accept: Callable[[dict, Groups], None], log: Callable[[str], None]
) -> Path | None:
    """Hand the newest snapshot that reads cleanly and that `accept` takes (it raises
    SnapshotError or ValueError to refuse one) to `accept`; returns its path, or None."""
    for path in snapshots(directory):
        try:
            state, groups = read(path)
            accept(state, groups)
        except (SnapshotError, ValueError) as exc:
            log(f"replay: snapshot {path} rejected ({exc}); trying the previous one")
            continue
        return path
    return None


@dataclass
class Outcome:
    """What became of one snapshot: ok, seq, path, seconds taken and the fork's pause."""

    ok: bool
    seq: int
    path: str
    seconds: float
    pause_ms: float


class Snapshotter:
    """Runs at most one snapshot child at a time.

    Example:
        snaps = Snapshotter(shard_dir("/data/replay", 0))
        snaps.start(server.snapshot_state)  # returns at once; the child writes
        outcome = snaps.poll()  # None while the child runs
    """

    def __init__(self, directory: Path):
        self.directory = directory
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(
                f"cannot create the snapshot directory {directory} ({exc.strerror}): "
                "set replay.snapshot_dir to a writable path"
            ) from None
        existing = snapshots(directory)
        self.seq = int(existing[0].name[len(PREFIX) :]) + 1 if existing else 1
        self.child = 0
        self.started = 0.0
        self.pause_ms = 0.0

    @property
    def running(self) -> bool:
        """Whether a child is writing a snapshot now."""
        return self.child != 0

    def start(self, export: Callable[[], tuple[dict, Groups]]) -> None:
        """Fork a child that writes `export()` (called in the child) as the next snapshot."""
        if self.child:
            raise RuntimeError("a snapshot is already being written")
        t0 = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            self._child(export)  # never returns
        self.pause_ms = (time.perf_counter() - t0) * 1000
        self.child, self.started = pid, time.monotonic()

    def _child(self, export: Callable[[], tuple[dict, Groups]]) -> None:
        # No cyclic GC here: collecting a zero-copy zmq.Frame would call into libzmq, whose
        # threads did not come along through fork.
        gc.disable()
        code = 1
        try:
            with contextlib.suppress(OSError):
                os.nice(10)  # the serving parent comes first on a busy host
            state, groups = export()
            write(self.directory, self.seq, state, groups)
            code = 0
        except BaseException:  # the child must reach os._exit whatever happens
            with contextlib.suppress(OSError):
                os.write(2, f"replay: snapshot writer failed:\n{traceback.format_exc()}".encode())
        finally:
            os._exit(code)

    def poll(self, block: bool = False) -> Outcome | None:
        """The outcome once the child has exited (reaped here), else None."""
        if not self.child:
            return None
        pid, status = os.waitpid(self.child, 0 if block else os.WNOHANG)
        if pid == 0:
            return None
        ok = os.waitstatus_to_exitcode(status) == 0
        path = self.directory / f"{PREFIX}{self.seq:012d}"
        outcome = Outcome(ok, self.seq, str(path), time.monotonic() - self.started, self.pause_ms)
        self.child = 0
        if ok:
            self.seq += 1
        return outcome

    def wait(self, timeout: float) -> Outcome | None:
        """Block until the child exits or `timeout` passes (then None; the child goes on)."""
        deadline = time.monotonic() + timeout
        while self.child and time.monotonic() < deadline:
            outcome = self.poll()
            if outcome is not None:
                return outcome
            time.sleep(0.01)
        return None


def log(message: str) -> None:
    """One line to stderr, the shard's log."""
    print(message, file=sys.stderr, flush=True)


def request(endpoint: str, timeout: float) -> dict[str, Any]:
    """Ask a running shard for a snapshot now (e.g. before a planned shutdown); returns the
    shard's `snapshot` reply once that snapshot is on disk."""
    late = f"replay shard {endpoint} wrote no snapshot within {timeout:g}s"
    reply = connect.call(endpoint, protocol.snapshot_request(), timeout, late)
    if reply.get("op") != protocol.Reply.SNAPSHOT:
        raise ProtocolError(f"replay shard {endpoint} refused a snapshot: {protocol.error_message(reply)}")
    return reply
