"""Process lifecycle shared by every role: stop on SIGTERM/SIGINT, die with the parent.

`canopy up` sets CANOPY_PARENT_PID for its children; `watch_parent` then asks the kernel
to SIGKILL this process when the parent dies (PR_SET_PDEATHSIG, kept across exec, so
`canopy redis` passes it to redis-server), so no role outlives a crashed launcher.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from canopy.errors import DeadlineExceeded

PR_SET_PDEATHSIG = 1


def watch_parent() -> None:
    """Die with the launcher that started us, if one did."""
    parent = os.environ.get("CANOPY_PARENT_PID")
    if not parent or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != int(parent):  # the parent died before prctl took effect
        os._exit(1)


def stop_event() -> threading.Event:
    """An event set by SIGTERM or SIGINT; role loops check it and wind down."""
    event = threading.Event()

    def handler(signum: int, frame: object) -> None:
        event.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return event


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.01) -> Any:
    """Poll `predicate` until it returns something truthy (returned); DeadlineExceeded after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise DeadlineExceeded(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)
