"""Shared fixtures: a real password-protected redis-server, polling, free ports, a repo root.

Every process a fixture starts is stopped in its teardown, whether the test passed or not.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from canopy import tls
from canopy.cluster import redis_server as redis_conf
from canopy.config import ClusterConfig
from canopy.errors import DeadlineExceeded
from canopy.keys import Keys
from canopy.lifecycle import wait_until
from canopy.redisconn import connect

REPO_ROOT = Path(__file__).resolve().parent.parent
REDIS_START_TIMEOUT_S = 10.0
# CANOPY_TEST_TLS=1: the Redis fixtures (redis_server here, tests/redis_shards.py) run TLS-only
# servers and their clients verify them (cluster.tls), so a suite that talks to Redis runs
# unchanged over TLS (`CANOPY_TEST_TLS=1 pytest tests/fuzz`).
TEST_TLS = os.environ.get("CANOPY_TEST_TLS") == "1"


def redis_listen(workdir: Path, port: int) -> tuple[list[str], dict[str, Any]]:
    """redis.conf lines that make a test server listen on `port`, and the ClusterConfig fields
    its clients need: TLS-only with a CA made in workdir/tls (beside its redis.password) under
    CANOPY_TEST_TLS=1, plain TCP else."""
    if not TEST_TLS:
        return [f"port {port}"], {}
    tls_dir = workdir / "tls"
    if not (tls_dir / tls.CA_CERT).exists():
        tls.generate(tls_dir)
    return redis_conf.tls_lines(tls_dir, port), {"tls": True}


def wait_for(
    predicate: Callable[[], Any], timeout: float, interval: float = 0.01, what: str = "condition"
) -> Any:
    """Poll `predicate` until it returns something truthy (returned) or fail after `timeout` s."""
    try:
        return wait_until(predicate, timeout, what, interval)
    except DeadlineExceeded as exc:
        raise AssertionError(str(exc)) from None


def mlp_weights(seed: int, rows: int = 64) -> dict[str, np.ndarray]:
    """Random weights of a CartPole-shaped MLP (4 -> rows -> 2), as a publisher sends them."""
    rng = np.random.default_rng(seed)
    return {
        "layers.0.weight": rng.normal(size=(rows, 4)).astype(np.float32),
        "layers.0.bias": rng.normal(size=rows).astype(np.float32),
        "layers.1.weight": rng.normal(size=(2, rows)).astype(np.float32),
        "layers.1.bias": np.zeros(2, np.float32),
    }


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def start_role(role: str, cfg_path: Path, ident: int, log: Path) -> subprocess.Popen:
    """`canopy ROLE --config CFG --id N` as its own process, output appended to `log`; the
    caller stops it (`stop_process`). Not a child of a launcher: no CANOPY_PARENT_PID."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("CANOPY_PARENT_PID", None)
    cmd = [sys.executable, "-m", "canopy.cluster.cli", role, "--config", str(cfg_path), "--id", str(ident)]
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `timeout`; always reaps the child."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)


@dataclass
class RedisServer:
    host: str
    port: int
    user: str
    password: str
    password_file: Path
    proc: subprocess.Popen
    tls: dict[str, Any]  # cluster.tls, under CANOPY_TEST_TLS=1

    def cluster_config(self) -> ClusterConfig:
        return ClusterConfig(
            host=self.host,
            redis=[f"{self.host}:{self.port}"],
            redis_user=self.user,
            password_file=str(self.password_file),
            **self.tls,
        )


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server on a free loopback port; the default user is off, ours has a password."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    workdir = tmp_path_factory.mktemp("redis")
    password = secrets.token_urlsafe(24)
    password_file = workdir / "redis.password"
    password_file.write_text(password)
    last_error = ""
    for _attempt in range(3):  # a free port can be taken between probing and binding
        port = free_port()
        conf = workdir / "redis.conf"
        listen, tls_fields = redis_listen(workdir, port)
        conf.write_text(
            "\n".join(
                [
                    *listen,
                    "bind 127.0.0.1",
                    "protected-mode yes",
                    'save ""',
                    "appendonly no",
                    f"dir {workdir}",
                    "daemonize no",
                    "user default off",
                    f"user canopy on >{password} ~* &* +@all",
                ]
            )
            + "\n"
        )
        os.chmod(conf, 0o600)
        log = open(workdir / f"redis-{port}.log", "wb")  # noqa: SIM115 (closed in finally)
        proc = subprocess.Popen([binary, str(conf)], stdout=log, stderr=subprocess.STDOUT)
        server = RedisServer("127.0.0.1", port, "canopy", password, password_file, proc, tls_fields)
        try:
            client = connect(server.cluster_config(), "test", 0)
            deadline = time.monotonic() + REDIS_START_TIMEOUT_S
            while proc.poll() is None and time.monotonic() < deadline:
                try:
                    if client.ping():
                        break
                except redis.ConnectionError:
                    time.sleep(0.02)
            else:
                last_error = (workdir / f"redis-{port}.log").read_text(errors="replace")
                continue
            client.close()
            yield server
            return
        finally:
            stop_process(proc)
            log.close()
    pytest.fail(f"redis-server did not start: {last_error[-500:]}")


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    r = connect(redis_server.cluster_config(), "test", 0)
    try:
        yield r
    finally:
        r.close()


@pytest.fixture
def run_keys(redis_client: redis.Redis) -> Iterator[Keys]:
    """Keys of a fresh run name; its keys are deleted afterwards so tests never share state."""
    keys = Keys(f"test-{uuid.uuid4().hex[:12]}")
    try:
        yield keys
    finally:
        stale = list(redis_client.scan_iter(match=keys.prefix + "*"))
        if stale:
            redis_client.delete(*stale)
