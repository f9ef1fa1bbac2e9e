"""The bare-metal path across hosts, without docker: roles in separate network namespaces.

deploy/cluster.toml with its compose service names replaced by namespace addresses is
planned with `canopy hosts plan --json`, and every host runs exactly the commands the
plan prints for it: Redis shards on one host, the replay shard and cache node on another,
learner and evaluator on a third, actors on a fourth. CartPole trains until the learner
has published versions and actors on their own host act with a recent one.

With the deploy files' security on: the secrets come from the compose `keys` service's
command (deploy/make_secrets.py), every ZeroMQ socket uses CURVE (a stranger's key gets no
answer and is counted) and every role talks to Redis as its own least-privilege user.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import REPO_ROOT, stop_process, wait_for

from canopy.cluster import netns
from canopy.cluster.bench.cutoff import deploy_config, host_plan
from canopy.keys import Keys
from canopy.version import Version

pytestmark = pytest.mark.slow

REDIS_UP_S = 20.0
TRAIN_S = 75.0
PROGRESS_S = 30.0
# Small and quick, on top of the deploy config: one CPU is shared by every role here.
SPEEDUPS = {
    "replay": {"min_size": 300, "capacity": 20_000},
    "learner": {"device": "cpu", "hidden": [64, 64], "batch_size": 64, "publish_every": 10},
    "actors": {"count": 2, "envs": 2, "chunk": 32},
    "eval": {"episodes": 1, "min_interval_s": 5.0},
    # No failover here: a lease that outlives a few seconds of CPU starvation keeps the one
    # learner from fencing itself on a loaded machine.
    "checkpoint": {"standby": False, "lease_ttl_s": 5.0},
    "redis": {"maxmemory_mb": 128},
    "run": {"heartbeat_s": 0.5},
}


@pytest.fixture
def network() -> Iterator[netns.Network]:
    reason = netns.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with netns.Network(["redis", "data", "learner", "actors"]) as net:
        yield net


# Run on the actors' host: a CURVE client with a key the cluster never authorized asks the
# replay shard for its stats; exit 0 when no answer came (the handshake was refused).
STRANGER = """
import sys, zmq, zmq.auth
from canopy import wire
endpoint = sys.argv[1]
server_public, _ = zmq.auth.load_certificate(sys.argv[2])
sock = zmq.Context.instance().socket(zmq.DEALER)
sock.linger = 0
sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
sock.curve_serverkey = server_public
sock.connect(endpoint)
sock.send_multipart(wire.encode({"op": "stats"}))
sys.exit(1 if sock.poll(2000) else 0)
"""


def cluster_config(net: netns.Network, tmp_path: Path) -> tuple[Path, Keys, str, list[str]]:
    """deploy/cluster.toml on the namespace hosts, with SPEEDUPS; (file, keys, operator password,
    redis-cli options)."""
    doc = tomllib.loads((REPO_ROOT / "deploy" / "cluster.toml").read_text())
    assert doc["cluster"]["role_users"] and doc["cluster"]["curve_dir"], "the deploy config is secure"
    assert doc["cluster"]["tls"], "the deploy config speaks TLS to Redis"
    assert doc["cluster"]["bind_all"], "deploy/cluster.toml binds every interface, as the hosts here do"
    path, password, cli_options = deploy_config(net, tmp_path, SPEEDUPS)
    return path, Keys(tomllib.loads(path.read_text())["run"]["name"]), password, cli_options


def test_roles_on_four_namespace_hosts_train_cartpole(network: netns.Network, tmp_path: Path) -> None:
    config, keys, password, cli_options = cluster_config(network, tmp_path)
    plan = host_plan(config, network, {"learner": "learner", "evaluator": "learner", "actor": "actors"})
    assert [h.name for h, _ in plan] == ["redis", "data", "learner", "actors"]
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONUNBUFFERED": "1",
        "CANOPY_PARENT_PID": str(os.getpid()),  # roles die with this test, even if it is killed
    }
    logs = tmp_path / "logs"
    logs.mkdir()
    operator = network["actors"]  # redis-cli from another host than Redis, as an operator would

    def cli(*args: str) -> str:
        result = operator.run(
            ["redis-cli", *cli_options, *args],
            env={**env, "REDISCLI_AUTH": password},
            timeout=10,
        )
        return result.stdout.strip() if result.returncode == 0 else ""

    def counter(role: str, ident: int, name: str) -> int:
        return int(cli("HGET", keys.proc(role, ident), name) or 0)

    started: list[tuple[str, subprocess.Popen]] = []

    def wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
        try:
            wait_for(predicate, timeout, 0.5, what)
        except AssertionError as exc:  # the roles' logs as they were when the wait failed
            logs_now = (f"--- {p.name}: {p.read_text(errors='replace')[-600:]}" for p in logs.iterdir())
            raise AssertionError("\n".join([str(exc), *logs_now])) from None

    try:
        for host, commands in plan:
            for cmd in commands:
                name = f"{cmd[1]}-{cmd[cmd.index('--id') + 1]}"
                with open(logs / f"{name}.log", "wb") as log:
                    proc = host.popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
                started.append((name, proc))
            if host.name == "redis":
                wait(lambda: cli("PING") == "PONG", REDIS_UP_S, "Redis shard 0 to answer")

        def none_died() -> None:
            dead = [name for name, p in started if p.poll() is not None]
            assert not dead, f"{dead} exited early"

        def learned() -> bool:
            none_died()
            return counter("learner", 0, "versions_published_total") >= 3 and all(
                counter("actor", i, "env_steps_total") > 0 for i in range(2)
            )

        wait(learned, TRAIN_S, "versions published and actors stepping")
        updates = counter("learner", 0, "updates_total")
        published = counter("learner", 0, "versions_published_total")
        inserts = counter("replay", 0, "inserts_total")
        newest = Version.parse(cli("GET", keys.model_latest))

        def actor_stats(i: int) -> dict[str, str]:
            flat = cli("HGETALL", keys.proc("actor", i)).splitlines()
            return dict(zip(flat[::2], flat[1::2], strict=True))

        def progressed() -> bool:
            # Recent: every actor moved past the version that was newest a moment ago.
            none_died()
            return (
                counter("learner", 0, "updates_total") > updates
                and counter("learner", 0, "versions_published_total") > published
                and counter("replay", 0, "inserts_total") > inserts
                and all(Version.parse(actor_stats(i)["policy_version"]) > newest for i in range(2))
            )

        wait(progressed, PROGRESS_S, f"more updates, versions and inserts, actors past {newest}")
        for i in range(2):
            assert actor_stats(i)["host"] == network["actors"].netns, f"actor {i} ran on the actors' host"
        assert cli("HGET", keys.proc("learner", 0), "host") == network["learner"].netns
        assert cli("HGET", keys.proc("replay", 0), "host") == network["data"].netns

        # Every role's connections to the root use that role's own Redis user.
        users = {}
        for line in cli("CLIENT", "LIST").splitlines():
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            if fields.get("name", "").startswith("canopy:"):
                users.setdefault(fields["name"].split(":")[1], set()).add(fields["user"])
        assert {role: users.get(role) for role in ("learner", "actor", "replay", "cache", "evaluator")} == {
            role: {role} for role in ("learner", "actor", "replay", "cache", "evaluator")
        }, users
        # CURVE: a peer with an unauthorized key gets nothing, and the shard counts it.
        server_key = tmp_path / "secrets" / "curve" / "server" / "replay.key"
        replay_endpoint = f"tcp://{network['data'].address}:5555"
        stranger = operator.run([sys.executable, "-c", STRANGER, replay_endpoint, str(server_key)], env=env)
        assert stranger.returncode == 0, f"a stranger's key got an answer: {stranger.stderr}"
        wait(
            lambda: counter("replay", 0, "curve_refused_total") >= 1,
            15,
            "the replay shard to count the stranger",
        )
    finally:
        for _, proc in reversed(started):  # actors first, Redis last: nobody waits on a gone role
            stop_process(proc, timeout=10)
