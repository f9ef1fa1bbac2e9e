"""CURVE encryption and authentication for ZeroMQ sockets that leave the host.

Place in the data flow: when `cluster.curve_dir` names a key directory made by
`canopy keys DIR`, every role that binds a tcp socket (replay shards, cache nodes) makes it
a CURVE server and every role that connects to one (actors, learners, evaluators, child
cache nodes) a CURVE client. The deploy files, whose sockets listen on every interface,
turn it on; a local `canopy up`, whose sockets listen on loopback only, leaves it off.

Keys (zmq.auth certificate files, secret files mode 600):
    DIR/server.key, DIR/server.key_secret   the cluster's server keypair
    DIR/client.key, DIR/client.key_secret   the keypair every role presents as a client
    DIR/authorized/*.key                     client public keys a server accepts
A peer whose key is not authorized, or that does not speak CURVE at all, never completes
the handshake: the server's ZAP handler refuses it and counts it (`refused_total`).
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from canopy.config import ClusterConfig
from canopy.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class Keys:
    """The cluster's CURVE keys as one process uses them (z85 bytes)."""

    public: bytes
    secret: bytes
    server_public: bytes
    server_secret: bytes
    authorized: frozenset[bytes]  # z85 client public keys


def generate(directory: str | Path) -> Path:
    """`canopy keys DIR`: a fresh server and client keypair, the client authorized."""
    d = Path(directory)
    if (d / "server.key_secret").exists():
        raise UserError(f"{d} already holds keys: remove it first or choose another directory")
    (d / "authorized").mkdir(parents=True, exist_ok=True)
    for name in ("server", "client"):
        _, secret = zmq.auth.create_certificates(d, name)
        os.chmod(secret, 0o600)
    shutil.copy(d / "client.key", d / "authorized" / "client.key")
    return d


def load(cluster: ClusterConfig) -> Keys | None:
    """The cluster's keys, or None when CURVE is off (`cluster.curve_dir` empty)."""
    if not cluster.curve_dir:
        return None
    d = Path(cluster.curve_dir)
    try:
        public, secret = zmq.auth.load_certificate(d / "client.key_secret")
        server_public, server_secret = zmq.auth.load_certificate(d / "server.key_secret")
        allowed = sorted((d / "authorized").glob("*.key"))
        authorized = frozenset(zmq.auth.load_certificate(p)[0] for p in allowed)
    except (OSError, ValueError) as exc:
        hint = f"create them with `canopy keys {d}`"
        raise UserError(f"cannot read CURVE keys from {d} ({exc}): {hint}") from None
    if secret is None or server_secret is None:
        raise UserError(f"{d} lacks a secret key file: create the keys with `canopy keys {d}`")
    return Keys(public, secret, server_public, server_secret, authorized)


def _tcp(endpoint: str) -> bool:
    return urlsplit(endpoint).scheme == "tcp"


@dataclass
class Gate:
    """The ZAP handler of one process's context: accepts authorized client keys, counts refusals."""

    keys: Keys
    refused_total: int = 0
    _auth: ThreadAuthenticator | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP's question for a connecting client: is its public key authorized?"""
        ok = key in self.keys.authorized
        if not ok:
            with self._lock:
                self.refused_total += 1
        return ok

    def start(self, ctx: zmq.Context) -> None:
        """Run the ZAP handler thread for `ctx`, asking `callback` about every CURVE client."""
        self._auth = ThreadAuthenticator(ctx, log=log)
        self._auth.start()
        self._auth.configure_curve_callback("*", credentials_provider=self)

    def stop(self) -> None:
        """Stop the handler thread, if it runs."""
        if self._auth is not None:
            self._auth.stop()
            self._auth = None


_gates: dict[int, Gate] = {}


def gate(ctx: zmq.Context, keys: Keys) -> Gate:
    """The context's one Gate, started on first use (ZAP has one handler per context)."""
    g = _gates.get(id(ctx))
    if g is None:
        g = _gates[id(ctx)] = Gate(keys)
        g.start(ctx)
    return g


def close_gate(ctx: zmq.Context) -> None:
    """Stop the context's ZAP handler, before `ctx.term()`."""
    g = _gates.pop(id(ctx), None)
    if g is not None:
        g.stop()


_process_keys: Keys | None = None


def use(keys: Keys | None) -> None:
    """Set this process's keys (`canopy <role>` does it once from `cluster.curve_dir`)."""
    global _process_keys
    _process_keys = keys


def bind(sock: zmq.Socket, endpoint: str) -> None:
    """Bind; a CURVE server when this process has keys (every tcp socket then, loopback
    too, so a client never has to guess which of a server's addresses is encrypted)."""
    keys = _process_keys
    if keys is not None and _tcp(endpoint):
        gate(sock.context, keys)
        sock.curve_secretkey = keys.server_secret
        sock.curve_publickey = keys.server_public
        sock.curve_server = True
    sock.bind(endpoint)


def connect(sock: zmq.Socket, endpoint: str) -> None:
    """Connect; a CURVE client when this process has keys, matching `bind`."""
    keys = _process_keys
    if keys is not None and _tcp(endpoint):
        sock.curve_secretkey = keys.secret
        sock.curve_publickey = keys.public
        sock.curve_serverkey = keys.server_public
    sock.connect(endpoint)


def refused_total() -> int:
    """Peers refused by this process's ZAP handlers, for its stats hash."""
    return sum(g.refused_total for g in _gates.values())
