"""CURVE encryption, identities per role and the allow-lists servers check, for ZeroMQ sockets.

Place in the data flow: when `cluster.curve_dir` names a key directory made by
`canopy keys DIR`, every role that binds a tcp socket (replay shards, cache nodes) makes it
a CURVE server with its own server keypair, and every role that connects to one (actors,
evaluators, learners, child cache nodes, the operator's tools) a CURVE client with its
role's keypair. The deploy files, whose sockets listen on every interface, turn it on; a
local `canopy up`, whose sockets listen on loopback only, leaves it off.

Key layout (zmq.auth certificate files; secret files mode 600, folders 700):
    DIR/server/<server>.key              a server's public key (every client of it reads it)
    DIR/server/<server>.key_secret       its secret: that server's processes only
                                         (<server>: replay, cache)
    DIR/<role>/<role>.key[_secret]       a client role's keypair: that role's processes only
                                         (<role>: actor, evaluator, learner, cache, operator)
    DIR/authorized/<role>/*.key          public keys a server accepts as <role>: its allow-list
A server's ZAP handler (`Gate`) accepts a connecting client only when its public key is in
the allow-list of a role that may use that socket at all, and tags the connection with
User-Id `<role> <z85 key>`; the server reads it from every message (`role_of`) and
authorizes the message's op by the role sets of replay/protocol.py and cache/protocol.py.
The allow-lists are read again within RELOAD_S of a change, so removing a key file refuses
that key on new connections and on every later message of open ones. A peer that does not
speak CURVE at all never completes the handshake; one whose key is in no allow-list is
refused and counted (`refused_total`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from canopy.config import ClusterConfig
from canopy.errors import UserError

log = logging.getLogger(__name__)

# Client roles: each has a keypair of its own and an allow-list on every server.
ACTOR, EVALUATOR, LEARNER, CACHE, OPERATOR = "actor", "evaluator", "learner", "cache", "operator"
CLIENT_ROLES = (ACTOR, EVALUATOR, LEARNER, CACHE, OPERATOR)
# Servers: each kind has one keypair, held by its processes only.
REPLAY_SERVER, CACHE_SERVER = "replay", "cache"
SERVERS = (REPLAY_SERVER, CACHE_SERVER)
# What a process presents: its client role (None: it connects to nobody) and its server.
PROCESS_IDENTITIES: dict[str, tuple[str | None, str | None]] = {
    "replay": (None, REPLAY_SERVER),
    "cache": (CACHE, CACHE_SERVER),
    "actor": (ACTOR, None),
    "evaluator": (EVALUATOR, None),
    "learner": (LEARNER, None),
    "operator": (OPERATOR, None),  # `canopy up`'s launcher and the tools a person runs
}
RELOAD_S = 1.0  # how stale an allow-list may be after a key file is removed or added


@dataclass(frozen=True)
class Keys:
    """One process's CURVE keys (z85 bytes): what its role may hold, nothing more."""

    directory: Path
    role: str
    client: tuple[bytes, bytes] | None  # (public, secret) of its client role
    server: tuple[bytes, bytes] | None  # (public, secret) of the server it runs
    server_public: dict[str, bytes] = field(default_factory=dict)  # every server's, for connecting


def _keypair(directory: Path, name: str) -> list[Path]:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(directory, name)
    os.chmod(secret, 0o600)
    return [Path(public), Path(secret)]


def _fill(d: Path) -> list[Path]:
    made = []
    for name in SERVERS:
        if not (d / "server" / f"{name}.key_secret").exists():
            made += _keypair(d / "server", name)
    for role in CLIENT_ROLES:
        if not (d / role / f"{role}.key_secret").exists():
            made += _keypair(d / role, role)
            allowed = d / "authorized" / role
            allowed.mkdir(parents=True, exist_ok=True)
            (allowed / f"{role}.key").write_bytes((d / role / f"{role}.key").read_bytes())
            made.append(allowed / f"{role}.key")
    return made


def generate(directory: str | Path) -> Path:
    """`canopy keys DIR`: a keypair per server and per client role, each client authorized."""
    d = Path(directory)
    if (d / "server").exists() or (d / "server.key_secret").exists():
        raise UserError(f"{d} already holds keys: remove it first or choose another directory")
    _fill(d)
    return d


def complete(directory: str | Path) -> list[Path]:
    """The keypairs `directory` lacks, made (and authorized); the files made. For the deploy
    secrets step, which must keep the keys running roles already hold."""
    d = Path(directory)
    if (d / "server.key_secret").exists():
        raise UserError(f"{d} holds keys of the old one-keypair layout: move it away and rerun")
    return _fill(d)


def load(cluster: ClusterConfig, role: str) -> Keys | None:
    """The keys of a `role` process (a key of PROCESS_IDENTITIES), or None when CURVE is off
    (`cluster.curve_dir` empty)."""
    if not cluster.curve_dir:
        return None
    return load_dir(Path(cluster.curve_dir), role)


def load_dir(d: Path, role: str) -> Keys:
    """The keys of a `role` process from key directory `d` (see the module docstring)."""
    client_role, server = PROCESS_IDENTITIES[role]
    hint = f"create them with `canopy keys {d}`"
    if (d / "server.key_secret").exists() and not (d / "server").is_dir():
        raise UserError(f"{d} holds keys of the old one-keypair layout: {hint.replace(str(d), 'NEWDIR')}")
    try:
        client = _pair(d / client_role / f"{client_role}.key_secret") if client_role else None
        own = _pair(d / "server" / f"{server}.key_secret") if server else None
        publics = {p.stem: zmq.auth.load_certificate(p)[0] for p in sorted((d / "server").glob("*.key"))}
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read the {role}'s CURVE keys from {d} ({exc}): {hint}") from None
    return Keys(d, role, client, own, publics)


def mounts(role: str) -> list[str]:
    """What a `role` process (a key of PROCESS_IDENTITIES) reads of a key directory, relative
    to it (a trailing slash: the whole folder): what its host or container is given, no more."""
    client_role, server = PROCESS_IDENTITIES[role]
    paths = [f"server/{name}.key" for name in SERVERS]
    if client_role:
        paths.append(f"{client_role}/{client_role}.key_secret")
    if server:
        paths += [f"server/{server}.key_secret", "authorized/"]
    return paths


def _pair(path: Path) -> tuple[bytes, bytes]:
    public, secret = zmq.auth.load_certificate(path)
    if secret is None:
        raise ValueError(f"{path} holds no secret key")
    return public, secret


def read_allowed(d: Path) -> dict[bytes, str]:
    """z85 public key -> role, from the allow-lists `d/authorized/<role>/*.key`. A key listed
    under two roles is refused under both: which one it speaks for is unknowable."""
    seen: dict[bytes, set[str]] = {}
    for role in CLIENT_ROLES:
        for path in sorted((d / "authorized" / role).glob("*.key")):
            try:
                public, _ = zmq.auth.load_certificate(path)
            except (OSError, ValueError) as exc:
                log.warning("skipping allow-list entry %s: %s", path, exc)
                continue
            seen.setdefault(public, set()).add(role)
    for public, roles in seen.items():
        if len(roles) > 1:
            log.warning("key %s is authorized as %s: refused as all of them", public[:8], sorted(roles))
    return {public: roles.pop() for public, roles in seen.items() if len(roles) == 1}


def _tcp(endpoint: str) -> bool:
    return urlsplit(endpoint).scheme == "tcp"


class _Authenticator(ThreadAuthenticator):
    """pyzmq's ZAP handler thread, tagging each connection with its client's role."""

    def __init__(self, ctx: zmq.Context, gate: Gate) -> None:
        super().__init__(ctx, log=log)
        self.gate = gate

    def curve_user_id(self, client_public_key: bytes) -> str:
        key = z85.encode(client_public_key)
        return f"{self.gate.allowed().get(key, '')} {key.decode('ascii')}"


@dataclass
class Gate:
    """The ZAP handler of one process's context: accepts a client whose key one of the socket
    domain's roles allows, counts the refused, and names each message's role."""

    directory: Path
    refused_total: int = 0
    _domains: dict[str, frozenset[str]] = field(default_factory=dict)
    _allowed: dict[bytes, str] = field(default_factory=dict)
    _signature: tuple = ()
    _next_check: float = 0.0
    _auth: _Authenticator | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def allowed(self) -> dict[bytes, str]:
        """The allow-lists (z85 key -> role), read again within RELOAD_S of a change."""
        now = time.monotonic()
        if now >= self._next_check:
            with self._lock:
                self._next_check = now + RELOAD_S
                signature = self._files()
                if signature != self._signature:
                    self._allowed, self._signature = read_allowed(self.directory), signature
        return self._allowed

    def _files(self) -> tuple:
        root = self.directory / "authorized"
        out = []
        for role in CLIENT_ROLES:
            for p in sorted((root / role).glob("*.key")):
                try:
                    st = p.stat()
                except OSError:
                    continue
                out.append((str(p), st.st_mtime_ns, st.st_size))
        return tuple(out)

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP's question for a connecting client: may its key's role use this socket?"""
        ok = self.allowed().get(key) in self._domains.get(domain, ())
        if not ok:
            with self._lock:
                self.refused_total += 1
        return ok

    def role_of(self, frame: zmq.Frame) -> str | None:
        """The role a received message's connection speaks for, or None: its key has been
        removed from the allow-lists since it connected (or it never was a CURVE client)."""
        try:
            user_id = frame.get("User-Id")
        except zmq.ZMQError:
            return None
        role, _, key = str(user_id).partition(" ")
        return role if role and self.allowed().get(key.encode("ascii", "replace")) == role else None

    def admit(self, domain: str, roles: frozenset[str]) -> None:
        """Let clients of `roles` connect to sockets of ZAP `domain`."""
        self._domains[domain] = roles
        assert self._auth is not None
        self._auth.configure_curve_callback(domain, credentials_provider=self)

    def start(self, ctx: zmq.Context) -> None:
        """Run the ZAP handler thread for `ctx`."""
        self.allowed()
        self._auth = _Authenticator(ctx, self)
        self._auth.start()

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
        g = _gates[id(ctx)] = Gate(keys.directory)
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


def bind(sock: zmq.Socket, endpoint: str, domain: str, roles: frozenset[str]) -> Gate | None:
    """Bind; a CURVE server when this process has keys (every tcp socket then, loopback
    too, so a client never has to guess which of a server's addresses is encrypted), which
    admits clients of `roles` only. Returns the Gate that names each message's role (None:
    no CURVE on this socket, every op allowed)."""
    keys = _process_keys
    if keys is None or not _tcp(endpoint):
        sock.bind(endpoint)
        return None
    if keys.server is None:
        raise UserError(f"a {keys.role} process holds no server key: it cannot serve {endpoint}")
    g = gate(sock.context, keys)
    g.admit(domain, roles)
    sock.zap_domain = domain.encode()
    sock.curve_publickey, sock.curve_secretkey = keys.server
    sock.curve_server = True
    sock.bind(endpoint)
    return g


def connect(sock: zmq.Socket, endpoint: str, server: str) -> None:
    """Connect to a `server` (one of SERVERS); a CURVE client when this process has keys."""
    keys = _process_keys
    if keys is not None and _tcp(endpoint):
        as_client(sock, keys, server)
    sock.connect(endpoint)


def as_client(sock: zmq.Socket, keys: Keys, server: str) -> None:
    """Make `sock` a CURVE client of a `server` presenting `keys`' client keypair (before connect)."""
    if keys.client is None:
        raise UserError(f"a {keys.role} process holds no client key: it cannot connect to a {server}")
    public = keys.server_public.get(server)
    if public is None:
        raise UserError(f"no public key of the {server} servers in {keys.directory}/server")
    sock.curve_publickey, sock.curve_secretkey = keys.client
    sock.curve_serverkey = public


def refused_total() -> int:
    """Peers refused by this process's ZAP handlers, for its stats hash."""
    return sum(g.refused_total for g in _gates.values())
