"""Redis over TLS (cluster.tls) from outside: a real TLS-only redis-server configured as
cluster/redis_server.py configures a shard, and clients that must verify it or be refused."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from conftest import free_port, stop_process, wait_for

from canopy import tls
from canopy.cache.rawget import ChunkReader
from canopy.cluster.redis_server import tls_lines
from canopy.config import ClusterConfig
from canopy.redisconn import connect

PASSWORD = "pw-" + "t" * 20


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterConfig]:
    """A TLS-only redis-server on 127.0.0.1 and 127.0.0.2 (its certificate names only the first)."""
    workdir: Path = tmp_path_factory.mktemp("tls-redis")
    tls_dir = tls.generate(workdir / "tls")
    (workdir / "redis.password").write_text(PASSWORD)
    port = free_port()
    conf = workdir / "redis.conf"
    lines = [*tls_lines(tls_dir, port), "bind 127.0.0.1 127.0.0.2", 'save ""', "appendonly no"]
    lines += ["user default off", f"user canopy on >{PASSWORD} ~* &* +@all"]
    conf.write_text("\n".join(lines) + "\n")
    log = open(workdir / "redis.log", "wb")  # noqa: SIM115 (closed in finally)
    proc = subprocess.Popen(
        [shutil.which("redis-server") or "/usr/bin/redis-server", str(conf)], stdout=log, stderr=log
    )
    cluster = ClusterConfig(
        redis=[f"127.0.0.1:{port}"],
        redis_user="canopy",
        password_file=str(workdir / "redis.password"),
        tls=True,  # the CA in tls/ beside the password file
    )
    r = connect(cluster, "test", 0)

    def up() -> bool:
        try:
            return bool(r.ping())
        except redis.ConnectionError:
            assert proc.poll() is None, (workdir / "redis.log").read_text()
            return False

    try:
        wait_for(up, 10, interval=0.05, what="a TLS redis-server")
        yield cluster
    finally:
        r.close()
        stop_process(proc)
        log.close()


def _port(cluster: ClusterConfig) -> int:
    return int(cluster.redis[0].rpartition(":")[2])


def test_a_client_that_verifies_the_shard_reads_and_writes(tls_redis: ClusterConfig) -> None:
    r = connect(tls_redis, "test", 0)
    r.set("tls:k", b"v")
    assert r.get("tls:k") == b"v"
    assert isinstance(r.connection_pool.get_connection()._sock, ssl.SSLSocket)
    r.close()


def test_a_plaintext_client_is_refused(tls_redis: ClusterConfig) -> None:
    r = redis.Redis(port=_port(tls_redis), username="canopy", password=PASSWORD, socket_timeout=5)
    with pytest.raises(redis.ConnectionError):
        r.ping()
    r.close()


def test_a_client_with_another_ca_is_refused(tls_redis: ClusterConfig, tmp_path: Path) -> None:
    tls.generate(tmp_path / "tls")
    (tmp_path / "redis.password").write_text(PASSWORD)
    other = ClusterConfig(**{**vars(tls_redis), "password_file": str(tmp_path / "redis.password")})
    r = connect(other, "test", 0)
    with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
        r.ping()
    r.close()


def test_a_host_the_certificate_does_not_name_is_refused(tls_redis: ClusterConfig) -> None:
    elsewhere = ClusterConfig(**{**vars(tls_redis), "redis": [f"127.0.0.2:{_port(tls_redis)}"]})
    r = connect(elsewhere, "test", 0)
    with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
        r.ping()
    r.close()


def test_the_raw_chunk_reader_speaks_tls_too(tls_redis: ClusterConfig) -> None:
    r = connect(tls_redis, "test", 0)
    values = [bytes([i]) * (40_000 + i) for i in range(4)]  # several TLS records each
    keys = [f"tls:chunk:{i}" for i in range(len(values))]
    r.mset(dict(zip(keys, values, strict=True)))
    reader = ChunkReader.for_client(r)
    try:
        got = list(reader.read(keys, sum(map(len, values)), limit=50_000, window=2))
        assert [bytes(g) for g in got] == values
    finally:
        reader.close()
        r.close()
