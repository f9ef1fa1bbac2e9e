"""Sockets to replay shards: the DEALER a client holds per shard, and one-off requests.

Place in the data flow: InsertClient (replay/insert.py) and SampleClient (replay/sample.py)
keep a `dealer` to each shard they talk to; `call` is one request and its reply on a
socket of its own, for `request_stats` (tests, tools) and snapshot.request (a planned
shutdown, benchmarks). Headers come from replay/protocol.py.
"""

from __future__ import annotations

from typing import Any

import zmq

from canopy import curve, wire
from canopy.errors import DeadlineExceeded
from canopy.replay import protocol

STOP_CHECK_S = 0.2  # how often a blocked client call looks at its stop event and at membership


def dealer(ctx: zmq.Context, endpoint: str, max_frame: int) -> zmq.Socket:
    """A DEALER connected to `endpoint` (CURVE when the cluster has keys)."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, max_frame)
    curve.connect(sock, endpoint, curve.REPLAY_SERVER)
    return sock


def call(endpoint: str, header: dict[str, Any], timeout: float, late: str) -> dict[str, Any]:
    """Send `header` (no arrays) and return the reply's header; DeadlineExceeded(`late`)
    when none comes within `timeout` s."""
    sock = dealer(zmq.Context.instance(), endpoint, protocol.REPLY_MAX_FRAME)
    try:
        sock.send_multipart(wire.encode(header))
        if not sock.poll(int(timeout * 1000)):
            raise DeadlineExceeded(late)
        return wire.decode(sock.recv_multipart(), protocol.REPLY_MAX_FRAME).header
    finally:
        sock.close(0)


def request_stats(endpoint: str, timeout: float = 5.0) -> dict[str, Any]:
    """One shard's stats: its counters, flat (as in its Redis stats hash)."""
    late = f"replay shard {endpoint} did not answer stats in {timeout}s"
    return call(endpoint, protocol.stats_request(), timeout, late)
