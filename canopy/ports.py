"""Free loopback ports for a local run (the OS picks; each role then binds its own)."""

from __future__ import annotations

import socket


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports that were free a moment ago."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def bind_endpoint(endpoint: str, bind_all: bool) -> str:
    """The address to bind for a listed ZeroMQ endpoint: itself, or every interface."""
    if not bind_all:
        return endpoint
    return f"tcp://*:{endpoint.rpartition(':')[2]}"
