"""`canopy up --ray`: a Ray cluster of four network-namespace hosts trains CartPole, and survives faults.

A Ray head and three Ray workers, each `ray start` in its own namespace (cluster/netns.py),
so every node has an address of its own; one cluster serves both tests of this module.
Nodes offer roles by custom resources: `head` Redis shard 0 and learner 0, `data` Redis
shard 1, the replay shard, the cache node, the evaluator and the standby learner, `act1`
and `act2` one actor each.

- A run with CURVE and Redis over TLS on solves CartPole (a confirmed mean of 475) with its
  roles on all four hosts, and writes cluster.json and summary.json as `canopy up` does.
- A run that cannot solve (its threshold is out of reach) meets the faults: the active
  learner is killed with SIGKILL (the standby takes over under a new lease epoch, Ray
  restarts the killed one as a standby), then the replay shard (Ray restarts it on its own
  node, at its address), then every process of `act2` (its raylet, workers and roles: the
  host is gone) and Ray starts its actor again on another node. Training
  goes on after both, and the run still stops cleanly on SIGTERM.

CartPole solves within seconds of the roles being up here, before any fault could land;
hence a run for the solve and one for the faults, on the same cluster.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO_ROOT, stop_process, wait_for

from canopy import curve
from canopy.cluster import netns
from canopy.version import Version

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.fault]

NODES_UP_S = 120.0
START_TRIES = 3
START_S = 180.0
TRAIN_S = 120.0
SOLVE_S = 240.0
STOP_S = 90.0
# Roles by node (custom resources, cluster/ray_launch.py); CPUs are logical, kept small so
# Ray starts few idle workers on a machine of two cores.
NODES = {
    "head": ({"canopy_redis": 1, "canopy_learner": 1}, 2),
    "data": (
        {
            "canopy_redis": 1,
            "canopy_replay": 1,
            "canopy_cache": 1,
            "canopy_learner": 1,
            "canopy_evaluator": 1,
        },
        4,
    ),
    "act1": ({"canopy_actor": 1}, 2),
    "act2": ({"canopy_actor": 1}, 2),
}
RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    # A killed node is noticed in a few seconds, not the default tens.
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
    "RAY_prestart_worker_first_driver": "0",
}
SETTINGS = [
    "actors.count=2",
    "checkpoint.every_s=1.0",
    # A few seconds: CPU starvation of a loaded machine must not look like a dead learner.
    "checkpoint.lease_ttl_s=3.0",
    "redis.maxmemory_mb=128",
]


def namespace_pids(host: netns.Host) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", host.netns], capture_output=True, text=True, timeout=10)
    return [int(p) for p in out.stdout.split()]


def kill_host(host: netns.Host) -> None:
    """SIGKILL every process of `host` (`ray stop --force` for that node, and its roles)."""
    for pid in namespace_pids(host):
        with contextlib.suppress(ProcessLookupError):  # exited meanwhile
            os.kill(pid, signal.SIGKILL)


@dataclass
class RayCluster:
    net: netns.Network
    env: dict[str, str]
    address: str


@dataclass
class Run:
    """One `canopy up --ray` driver on the head host, and how to read its run."""

    cluster: RayCluster
    proc: subprocess.Popen
    run_dir: Path
    stderr: Path

    def failed(self, what: str) -> str:
        """`what`, the driver's stderr tail and every role log's tail."""
        logs = sorted((self.run_dir / "logs").glob("*.log")) if (self.run_dir / "logs").exists() else []
        tails = [f"--- {p.name}: {p.read_text(errors='replace')[-500:]}" for p in logs]
        return "\n".join([what, self.stderr.read_text(errors="replace")[-3000:], *tails])

    def wait(self, predicate: Callable[[], object], timeout: float, what: str) -> Any:
        try:
            return wait_for(predicate, timeout, 0.5, what)
        except AssertionError as exc:
            raise AssertionError(self.failed(str(exc))) from None

    def cluster_json(self) -> dict[str, Any]:
        path = self.run_dir / "cluster.json"
        self.wait(lambda: path.exists() or self.proc.poll() is not None, START_S, "cluster.json")
        assert self.proc.poll() is None or (self.run_dir / "summary.json").exists(), self.failed(
            "canopy up --ray exited before its roles were up"
        )
        return json.loads(path.read_text())


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    """A Ray head and three workers, one per namespace host; every process of theirs killed after."""
    pytest.importorskip("ray", reason="ray is not installed: pip install 'canopy-rl[ray]'")
    reason = netns.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    temp_dir = Path(tempfile.mkdtemp(prefix="cray", dir="/tmp"))  # short: Ray's socket paths
    env = {
        **os.environ,
        **RAY_ENV,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(REPO_ROOT),
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("CANOPY_PARENT_PID", None)
    with netns.Network(list(NODES)) as net:
        try:
            t0 = time.monotonic()
            start_ray(net, temp_dir, env)
            print(f"\nray: {len(NODES)} nodes up in {time.monotonic() - t0:.1f}s")
            yield RayCluster(net, env, f"{net['head'].address}:6379")
        finally:
            for host in net.hosts.values():
                kill_host(host)
            wait_for(
                lambda: not any(namespace_pids(h) for h in net.hosts.values()), 20, 0.2, "Ray nodes to exit"
            )
            shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def canopy_up_ray(ray_cluster: RayCluster, tmp_path: Path) -> Iterator[Callable[..., Run]]:
    """Factory: `canopy up --ray` on the head host with ARGS and SETTINGS; stopped after the test."""
    runs: list[Run] = []

    def launch(*args: str) -> Run:
        run_dir, stderr = tmp_path / "run", tmp_path / "up.err"
        cmd = [sys.executable, "-m", "canopy.cluster.cli", "up", "--ray", ray_cluster.address, "--env"]
        cmd += ["CartPole-v1", "--run-dir", str(run_dir), *args, *(x for s in SETTINGS for x in ("--set", s))]
        with open(stderr, "wb") as err, open(tmp_path / "up.out", "wb") as out:
            proc = ray_cluster.net["head"].popen(
                cmd, stdout=out, stderr=err, env=ray_cluster.env, cwd=tmp_path
            )
        runs.append(Run(ray_cluster, proc, run_dir, stderr))
        return runs[-1]

    try:
        yield launch
    finally:
        for run in runs:
            stop_process(run.proc, timeout=STOP_S)


def start_ray(net: netns.Network, temp_dir: Path, env: dict[str, str]) -> None:
    """`ray start` on every host, one after the other, the head first; returns once all joined.

    One at a time: on a loaded machine the head's GCS answers a crowd of joining nodes too
    late, and a node that timed out joining is started again (at most START_TRIES times).
    """
    head = net["head"].address
    for name, (resources, cpus) in NODES.items():
        where = ["--head", "--port", "6379", "--include-dashboard", "false"]
        if name != "head":
            where = ["--address", f"{head}:6379"]
        log = temp_dir / f"ray-{name}.log"
        argv = [str(Path(sys.executable).parent / "ray"), "start", *where, "--temp-dir", str(temp_dir)]
        argv += ["--node-ip-address", net[name].address, "--num-cpus", str(cpus)]
        argv += ["--resources", json.dumps(resources), "--object-store-memory", str(80 * 2**20)]
        argv += ["--disable-usage-stats", "--block"]
        for _ in range(START_TRIES):
            with open(log, "wb") as out:
                proc = net[name].popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
            wait_for(
                lambda log=log, proc=proc: (
                    proc.poll() is not None or "Ray runtime started" in log.read_text(errors="replace")
                ),
                NODES_UP_S,
                0.5,
                f"ray start on {name}: {log}",
            )
            if proc.poll() is None:
                break
            kill_host(net[name])  # what the failed try left running
        else:
            pytest.fail(f"ray start on {name} failed {START_TRIES} times: {log.read_text()[-2000:]}")


def test_a_secure_ray_run_solves_cartpole_with_its_roles_on_four_hosts(
    ray_cluster: RayCluster, canopy_up_ray: Callable[..., Run], tmp_path: Path
) -> None:
    net = ray_cluster.net
    # Secure as a deployment across hosts is: CURVE on every ZeroMQ socket and Redis over TLS,
    # so each role's actor must lay down its own keys and the CA on its node.
    keys = curve.generate(tmp_path / "curve")
    secure = ["--set", f'cluster.curve_dir="{keys}"', "--set", "cluster.tls=true"]
    run = canopy_up_ray("--stop-at-return", "475", "--time-limit", str(SOLVE_S - 60), *secure)
    cluster = run.cluster_json()
    assert cluster["launcher"] == "ray"
    hosts = {e["host"] for entries in cluster["roles"].values() for e in entries}
    assert hosts | {e["host"] for e in cluster["redis"]} == {h.address for h in net.hosts.values()}
    # Shards spread: Redis over head and data; each listening role advertises its node's address.
    assert [e["host"] for e in cluster["redis"]] == [net["head"].address, net["data"].address]
    for entries in (cluster["roles"]["replay"], cluster["roles"]["cache"]):
        for e in entries:
            assert e["host"] == net["data"].address
            assert all(a.startswith(f"tcp://{net['data'].address}:") for a in e["endpoints"].values())
    assert {e["id"]: e["host"] for e in cluster["roles"]["actor"]} == {
        0: net["act1"].address,
        1: net["act2"].address,
    }
    learners = {e["id"]: e for e in cluster["roles"]["learner"]}
    assert learners[0]["host"] == net["head"].address
    assert learners[1]["host"] == net["data"].address and learners[1].get("standby") is True

    try:
        code = run.proc.wait(SOLVE_S)
    except subprocess.TimeoutExpired:
        pytest.fail(run.failed(f"canopy up --ray still running after {SOLVE_S}s"))
    assert code == 0, run.failed(f"canopy up --ray exited {code}")
    summary = json.loads((run.run_dir / "summary.json").read_text())
    assert summary["solved"] is True, run.failed(f"not solved: {summary}")
    assert summary["env_steps_to_solve"] > 0 and summary["time_to_solve_s"] <= summary["wall_s"]
    print(
        f"\nray run: confirmed solve at {summary['time_to_solve_s']:.1f}s, "
        f"{summary['env_steps_to_solve']} env steps (best {summary['best_version']}: "
        f"{summary['best_return_mean']}); run {summary['wall_s']:.1f}s"
    )


def test_a_ray_run_trains_on_through_a_killed_learner_and_a_lost_host(
    ray_cluster: RayCluster, canopy_up_ray: Callable[..., Run]
) -> None:
    net = ray_cluster.net
    run = canopy_up_ray("--stop-at-return", "100000", "--time-limit", str(SOLVE_S))
    cluster = run.cluster_json()
    password = Path(cluster["password_file"]).read_text().strip()
    prefix = cluster["key_prefix"]
    root = cluster["redis"][0]
    redis_cli = ["redis-cli", "-h", root["host"], "-p", str(root["port"]), "--user", cluster["redis_user"]]

    def cli(*args: str) -> str:
        env = {**ray_cluster.env, "REDISCLI_AUTH": password}
        result = net["head"].run([*redis_cli, "--raw", *args], env=env, timeout=10)
        return result.stdout.strip() if result.returncode == 0 else ""

    def stats(role: str, ident: int) -> dict[str, str]:
        flat = cli("HGETALL", f"{prefix}proc:{role}:{ident}").splitlines()
        return dict(zip(flat[::2], flat[1::2], strict=False))

    def alive() -> None:
        assert run.proc.poll() is None, run.failed("canopy up --ray exited during the faults")

    def ready_for_learner_kill() -> bool:
        alive()
        events = cli("XRANGE", f"{prefix}events", "-", "+").splitlines()
        return "checkpoint_commit" in events and stats("learner", 1).get("state") == "standby"

    run.wait(ready_for_learner_kill, TRAIN_S, "a committed checkpoint and a warm standby")
    before = Version.parse(cli("GET", f"{prefix}model:latest"))
    killed = stats("learner", 0)["pid"]
    os.kill(int(killed), signal.SIGKILL)
    t_kill = time.monotonic()

    def newer_epoch() -> Version | None:
        alive()
        v = Version.parse(cli("GET", f"{prefix}model:latest"))
        return v if v.epoch > before.epoch else None

    after = run.wait(newer_epoch, 60, "a version of a newer lease epoch")
    learner_s = time.monotonic() - t_kill
    # Ray restarted the killed learner's actor: a new process, waiting as the standby.
    run.wait(
        lambda: (
            alive()
            or ((s := stats("learner", 0)).get("pid", killed) != killed and s.get("state") == "standby")
        ),
        60,
        "Ray to restart the killed learner as a standby",
    )

    # A listening role comes back on its own node, at its own address.
    shard = stats("replay", 0)["pid"]
    os.kill(int(shard), signal.SIGKILL)
    t_shard = time.monotonic()
    run.wait(
        lambda: (
            alive() or ((s := stats("replay", 0)).get("pid", shard) != shard and s.get("state") == "running")
        ),
        60,
        "Ray to restart the killed replay shard",
    )
    shard_s = time.monotonic() - t_shard
    assert stats("replay", 0)["host"] == net["data"].netns

    kill_host(net["act2"])
    t_host = time.monotonic()

    def moved() -> bool:
        alive()
        s = stats("actor", 1)
        return s.get("host") not in (None, net["act2"].netns) and s.get("state") == "running"

    run.wait(moved, 90, "actor 1 to run again on another node")
    host_s = time.monotonic() - t_host
    # Training goes on: both actors step on, the learner publishes more of the new epoch.
    steps = {i: int(stats("actor", i).get("env_steps_total", 0)) for i in (0, 1)}
    newest = Version.parse(cli("GET", f"{prefix}model:latest"))
    run.wait(
        lambda: (
            alive()
            or (
                all(int(stats("actor", i).get("env_steps_total", 0)) > steps[i] for i in (0, 1))
                and Version.parse(cli("GET", f"{prefix}model:latest")) > newest
            )
        ),
        60,
        "actors stepping and new versions after both faults",
    )

    # The operator's view works under Ray too: every role of cluster.json alive, from the head.
    status = net["head"].run(
        [sys.executable, "-m", "canopy.cluster.cli", "status", str(run.run_dir)],
        env=ray_cluster.env,
        timeout=60,
    )
    assert status.returncode == 0, run.failed(
        f"canopy status: {status.stdout[-2000:]} {status.stderr[-1000:]}"
    )

    run.proc.send_signal(signal.SIGTERM)
    try:
        code = run.proc.wait(STOP_S)
    except subprocess.TimeoutExpired:
        pytest.fail(run.failed(f"canopy up --ray still running {STOP_S}s after SIGTERM"))
    assert code == 0, run.failed(f"canopy up --ray exited {code} after SIGTERM")
    summary = json.loads((run.run_dir / "summary.json").read_text())
    assert summary["stop_reason"] == "signal"
    assert Version.parse(summary["newest_version"]).epoch >= after.epoch, summary
    print(
        f"\nray faults: new epoch {before} -> {after} {learner_s:.1f}s after the learner kill; "
        f"replay shard back {shard_s:.1f}s after its kill; actor 1 back on another node {host_s:.1f}s "
        "after its host died"
    )
