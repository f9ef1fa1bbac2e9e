"""Several real redis-server processes on free loopback ports, grouped into pretend hosts.

Used by the checkpoint tests: each shard can be SIGKILLed on its own; every process is
stopped when the fixture's context exits, pass or fail.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import free_port, redis_listen, stop_process

from canopy.config import ClusterConfig
from canopy.redisconn import connect


@dataclass
class Shards:
    workdir: Path
    password_file: Path
    procs: list[subprocess.Popen] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)
    tls: dict[str, Any] = field(default_factory=dict)  # cluster.tls, under CANOPY_TEST_TLS=1

    def cluster_config(self) -> ClusterConfig:
        return ClusterConfig(
            redis=[f"127.0.0.1:{p}" for p in self.ports],
            redis_user="canopy",
            password_file=str(self.password_file),
            **self.tls,
        )

    def clients(self, name: str = "test") -> list[redis.Redis]:
        cc = self.cluster_config()
        out = []
        for i in range(len(self.ports)):
            r = connect(cc, name, 0, shard=i)
            # Fail fast on a killed shard instead of retrying for the default 10 s.
            r.connection_pool.connection_kwargs.update(socket_timeout=2, socket_connect_timeout=1)
            out.append(r)
        return out

    def kill(self, i: int) -> None:
        self.procs[i].send_signal(signal.SIGKILL)
        self.procs[i].wait(timeout=10)

    def stop(self) -> None:
        for p in self.procs:
            stop_process(p, timeout=5)


def start_shards(n: int, workdir: Path, password: str = "pw-" + "x" * 20) -> Shards:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    password_file = workdir / "redis.password"
    password_file.write_text(password)
    shards = Shards(workdir, password_file)
    try:
        for i in range(n):
            port = free_port()
            conf = workdir / f"redis-{i}.conf"
            listen, shards.tls = redis_listen(workdir, port)
            conf.write_text(
                "\n".join(listen) + f'\nbind 127.0.0.1\nsave ""\nappendonly no\ndir {workdir}\n'
                f"user default off\nuser canopy on >{password} ~* &* +@all\n"
            )
            os.chmod(conf, 0o600)
            log = open(workdir / f"redis-{i}.log", "wb")  # noqa: SIM115 (the process owns it)
            shards.procs.append(subprocess.Popen([binary, str(conf)], stdout=log, stderr=subprocess.STDOUT))
            shards.ports.append(port)
        for i in range(n):
            client = connect(shards.cluster_config(), "test", 0, shard=i)
            deadline = time.monotonic() + 10
            while True:
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"redis-server on {port} did not start") from None
                    time.sleep(0.02)
            client.close()
    except BaseException:
        shards.stop()
        raise
    return shards


def shards_fixture(n: int):
    """A pytest fixture named by the assignment (`shards = shards_fixture(4)`): n real shards."""

    @pytest.fixture
    def shards(tmp_path: Path) -> Iterator[Shards]:
        s = start_shards(n, tmp_path)
        try:
            yield s
        finally:
            s.stop()

    return shards
