"""deploy/ for real on a Docker engine: the image builds, compose trains CartPole-v1 across
containers to a confirmed solve, the standby learner takes over from a killed one, a
restarted replay shard comes back with its data, and `down -v` leaves nothing behind.

Skipped when no Docker engine is reachable (CI starts one: scripts/docker-setup.sh). The
compose files run as shipped (deploy/cluster.toml: CURVE and per-role Redis users on), under
a project name of this test run's own; Compose v2 (`docker compose`) where the CLI has it,
Debian's `docker-compose` 1.29 otherwise.

Build inputs: the base image is $CANOPY_BASE_IMAGE, else the local `canopy-base:bookworm`
(deploy/make-base-image.sh) when present, else the Dockerfile's default (pulled from a
registry). torch comes from the CPU wheel that pip's configured find-links hold for the
torch installed here, served to the build as a local index, else from the Dockerfile's
default index.
"""

from __future__ import annotations

import functools
import http.server
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import gymnasium
import pytest
from conftest import REPO_ROOT, wait_for

from canopy import config as config_mod
from canopy.keys import Keys
from canopy.lease import parse_token
from canopy.version import Version

pytestmark = [pytest.mark.docker, pytest.mark.slow]

DEPLOY = REPO_ROOT / "deploy"
IMAGE = "canopy:cpu"  # what docker-compose.yml runs unless CANOPY_IMAGE says otherwise
LOCAL_BASE = "canopy-base:bookworm"  # deploy/make-base-image.sh's default tag
BUILD_S = 900.0  # a cold build downloads torch's dependencies
UP_S = 300.0
SOLVE_S = 420.0  # CartPole-v1 from `up` to a confirmed solve; about 2-3 min on 2 idle cores
TAKEOVER_S = 120.0
REPLAY_BACK_S = 120.0
ACTORS = 2

T = TypeVar("T")


def _run(argv: list[str], timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, check=False)


def _docker_cli() -> str | None:
    """A docker CLI that can build with BuildKit: one with the buildx plugin, or one older than
    23 (BuildKit built in, as Debian's docker.io 20.10). A newer CLI without buildx (which may
    come first on PATH) cannot."""
    candidates = [os.environ.get("DOCKER"), shutil.which("docker"), "/usr/bin/docker"]
    for cli in dict.fromkeys(c for c in candidates if c and os.access(c, os.X_OK)):
        if _run([cli, "buildx", "version"], 30).returncode == 0:
            return cli
        version = _run([cli, "version", "--format", "{{.Client.Version}}"], 30).stdout.strip()
        if version.split(".")[0].isdigit() and int(version.split(".")[0]) < 23:
            return cli
    return None


@dataclass
class Engine:
    docker: str
    compose: list[str]  # [docker, "compose"] or ["docker-compose"]

    def __call__(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        return _run([self.docker, *args], timeout)


@pytest.fixture(scope="module")
def engine() -> Engine:
    docker = _docker_cli()
    if docker is None:
        pytest.skip("no docker CLI that builds with BuildKit (buildx plugin, or docker.io 20.10)")
    server = _run([docker, "version", "--format", "{{.Server.Version}}"], 30)
    if server.returncode != 0 or not server.stdout.strip():
        why = (server.stderr.strip() or server.stdout.strip()).splitlines()
        pytest.skip(f"no Docker engine reachable ({why[0][:200] if why else 'no answer'})")
    if _run([docker, "compose", "version"], 30).returncode == 0:
        compose = [docker, "compose"]
    elif (legacy := shutil.which("docker-compose")) is not None:
        compose = [legacy]
    else:
        pytest.skip("neither `docker compose` (v2 plugin) nor docker-compose is installed")
    return Engine(docker, compose)


def _torch_wheel(directory: Path) -> Path | None:
    """The wheel of the torch installed here, from pip's configured find-links (no index)."""
    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None
    out = directory / "torch"  # a PEP 503 project page: INDEX/torch/ lists the wheel
    download = ["download", "--no-deps", "--no-index", "-q", "-d", str(out), f"torch=={version}"]
    got = _run([sys.executable, "-m", "pip", *download], 300)
    wheels = sorted(out.glob("torch-*.whl")) if got.returncode == 0 else []
    return wheels[0] if wheels else None


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # one line per request otherwise
        pass


@pytest.fixture(scope="module")
def image(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> str:
    """deploy/Dockerfile's `cpu` target, built as IMAGE on this engine."""
    args = ["build", "-f", str(DEPLOY / "Dockerfile"), "--target", "cpu", "-t", IMAGE]
    base = os.environ.get("CANOPY_BASE_IMAGE")
    if not base and engine("image", "inspect", LOCAL_BASE).returncode == 0:
        base = LOCAL_BASE
    if base:
        args += ["--build-arg", f"PYTHON_IMAGE={base}"]
    index_root = tmp_path_factory.mktemp("torch-index")
    server = None
    if _torch_wheel(index_root) is not None:
        handler = functools.partial(_QuietHandler, directory=str(index_root))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        # The build's RUN steps reach the host's loopback only on the host's network.
        index = f"http://127.0.0.1:{server.server_port}/"
        args += ["--network", "host", "--build-arg", f"TORCH_INDEX_URL={index}"]
    try:
        built = _run(
            [engine.docker, *args, str(REPO_ROOT)], BUILD_S, env={**os.environ, "DOCKER_BUILDKIT": "1"}
        )
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
    assert built.returncode == 0, f"docker build failed:\n{built.stdout[-3000:]}\n{built.stderr[-3000:]}"
    return IMAGE


def test_the_image_runs_canopy_as_an_unprivileged_user(engine: Engine, image: str) -> None:
    helped = engine("run", "--rm", image, "--help")
    assert helped.returncode == 0 and "learner" in helped.stdout, helped.stderr
    probe = "import os, torch, canopy; print(os.getuid(), torch.__version__)"
    ran = engine("run", "--rm", "--entrypoint", "python", image, "-c", probe, timeout=120)
    assert ran.returncode == 0, ran.stderr
    uid, torch_version = ran.stdout.split()
    assert uid == "1000"
    assert torch_version.split("+")[0] == importlib.metadata.version("torch").split("+")[0]


@dataclass
class Project:
    """One compose project (deploy/docker-compose.yml as shipped) under a name of its own."""

    engine: Engine
    name: str
    env: dict[str, str]
    keys: Keys
    started: float = 0.0
    containers: dict[str, str] = field(default_factory=dict)  # service -> id, of those never restarted

    def compose(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        argv = [*self.engine.compose, "-p", self.name, "-f", str(DEPLOY / "docker-compose.yml"), *args]
        return _run(argv, timeout, env=self.env)

    def container(self, service: str) -> str:
        ps = self.compose("ps", "-q", service, timeout=60)
        ids = ps.stdout.split()
        assert ps.returncode == 0 and len(ids) == 1, f"{service}: {ps.stdout} {ps.stderr}"
        return ids[0]

    def redis(self, *args: str, output: str = "--raw") -> str:
        """redis-cli on shard 0, inside its container, as the operator user, over TLS ("" on failure)."""
        secrets = "/run/secrets/canopy"
        script = (
            f'REDISCLI_AUTH="$(cat {secrets}/redis.password)" '
            f'exec redis-cli --tls --cacert {secrets}/tls/ca.crt --user canopy "$@"'
        )
        if "redis0" not in self.containers:
            self.containers["redis0"] = self.container("redis0")
        argv = ["exec", self.containers["redis0"], "sh", "-c", script, "sh", output, *args]
        got = self.engine(*argv, timeout=60)
        return got.stdout.strip() if got.returncode == 0 else ""

    def events(self, kind: str) -> list[dict[str, str]]:
        """The run's events (the `events` stream) of one kind, oldest first."""
        raw = self.redis("XRANGE", self.keys.events, "-", "+", output="--json")
        entries = json.loads(raw) if raw else []
        found = [dict(zip(fields[::2], fields[1::2], strict=True)) for _, fields in entries]
        return [e for e in found if e.get("kind") == kind]

    def hash(self, key: str) -> dict[str, str]:
        flat = self.redis("HGETALL", key).splitlines()
        return dict(zip(flat[::2], flat[1::2], strict=False))

    def latest(self) -> Version | None:
        text = self.redis("GET", self.keys.model_latest)
        return Version.parse(text) if text else None

    def logs(self) -> str:
        return self.compose("logs", "--no-color", "--tail", "20", timeout=60).stdout[-6000:]

    def wait(self, predicate: Callable[[], T | None], timeout: float, what: str) -> T:
        try:
            return wait_for(predicate, timeout, 2.0, what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.compose('ps').stdout}\n{self.logs()}") from None

    def leftovers(self) -> dict[str, list[str]]:
        label = f"label=com.docker.compose.project={self.name}"
        found = {}
        for kind in ("container", "network", "volume"):
            every = ["-a"] if kind == "container" else []
            listed = self.engine(kind, "ls", *every, "-q", "--filter", label)
            found[kind] = listed.stdout.split()
        return found


@pytest.fixture(scope="module")
def project(engine: Engine, image: str) -> Iterator[Project]:
    name = f"canopytest{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "CANOPY_IMAGE": image, "ACTORS": str(ACTORS)}
    cfg = config_mod.load(DEPLOY / "cluster.toml")
    proj = Project(engine, name, env, Keys(cfg.run.name))
    try:
        proj.started = time.time()
        up = proj.compose("up", "-d", "--no-build", timeout=UP_S)
        assert up.returncode == 0, f"compose up failed:\n{up.stdout[-3000:]}\n{up.stderr[-3000:]}"
        yield proj
    finally:
        proj.compose("down", "-v", "--remove-orphans", "--timeout", "10", timeout=300)


def test_compose_trains_cartpole_to_a_confirmed_solve(
    project: Project, record_property: Callable[[str, object], None]
) -> None:
    threshold = gymnasium.spec("CartPole-v1").reward_threshold
    cfg = config_mod.load(DEPLOY / "cluster.toml")

    def solved() -> dict[str, str] | None:
        best = project.hash(project.keys.best)
        if best and float(best["mean"]) >= threshold and int(best["episodes"]) == cfg.eval.confirm_episodes:
            return best
        return None

    best = project.wait(solved, SOLVE_S, f"a confirmed CartPole-v1 solve (mean >= {threshold})")
    to_solve = float(best["confirmed_at"]) - project.started
    record_property("time_to_solve_s", round(to_solve, 1))
    print(f"\ncompose up -> confirmed solve: {to_solve:.0f} s (version {best['version']}, {best['mean']})")
    # Every role ran in its container as its own Redis user, with CURVE and Redis TLS on (the
    # shipped config); the redis-cli calls here speak TLS, a plaintext one gets no answer.
    assert cfg.cluster.role_users and cfg.cluster.curve_dir and cfg.cluster.tls
    plain = project.engine("exec", project.containers["redis0"], "redis-cli", "ping", timeout=60)
    assert "PONG" not in plain.stdout, plain.stdout
    users: dict[str, set[str]] = {}
    for line in project.redis("CLIENT", "LIST").splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if fields.get("name", "").startswith("canopy:"):
            users.setdefault(fields["name"].split(":")[1], set()).add(fields["user"])
    roles = ("learner", "actor", "replay", "cache", "evaluator")
    assert {role: users.get(role) for role in roles} == {role: {role} for role in roles}, users
    hosts = {project.hash(project.keys.proc("actor", i)).get("host") for i in range(ACTORS)}
    assert len(hosts) == ACTORS and None not in hosts, "each actor in a container of its own"


def test_the_standby_takes_over_from_a_killed_learner(project: Project) -> None:
    holder = parse_token(project.redis("GET", project.keys.lease))
    assert holder is not None, "a learner holds the lease"
    epoch, owner = holder
    services = {0: "learner", 1: "learner-standby"}
    killed = project.engine("kill", project.container(services[owner]))
    assert killed.returncode == 0, killed.stderr
    t_kill = time.monotonic()

    def new_epoch() -> Version | None:
        latest = project.latest()
        return latest if latest is not None and latest.epoch > epoch else None

    first = project.wait(new_epoch, TAKEOVER_S, f"a version of an epoch after {epoch}")
    took = parse_token(project.redis("GET", project.keys.lease))
    assert took is not None and took[1] == 1 - owner, f"the other learner holds the lease: {took}"
    project.wait(
        lambda: (v := project.latest()) is not None and v.epoch == first.epoch and v.step > first.step,
        TAKEOVER_S,
        f"training to go on after {first}",
    )
    print(f"\nlearner {owner} killed -> version {first} of the standby: {time.monotonic() - t_kill:.0f} s")


def test_a_restarted_replay_shard_comes_back_with_its_data(project: Project) -> None:
    held = int(project.hash(project.keys.proc("replay", 0))["items"])
    assert held > 0

    def replay_restores() -> list[dict[str, str]]:
        return [e for e in project.events("restore") if (e.get("role"), e.get("id")) == ("replay", "0")]

    restores = len(replay_restores())
    # A stop (SIGTERM) writes a last snapshot into the shard's volume (replay.snapshot_dir).
    restarted = project.compose("restart", "--timeout", "60", "replay0", timeout=180)
    assert restarted.returncode == 0, restarted.stderr

    def restored() -> dict[str, str] | None:
        found = replay_restores()[restores:]
        return found[0] if found else None

    event = project.wait(restored, REPLAY_BACK_S, "the restarted replay shard to restore a snapshot")
    assert int(event["items"]) >= held, f"it held {held} items before the restart: {event}"
    project.wait(
        lambda: project.hash(project.keys.proc("replay", 0)).get("state") == "running",
        REPLAY_BACK_S,
        "the restored replay shard to serve",
    )


def test_down_v_leaves_no_container_network_or_volume(project: Project) -> None:
    assert any(project.leftovers().values())
    down = project.compose("down", "-v", "--remove-orphans", "--timeout", "10", timeout=300)
    assert down.returncode == 0, down.stderr
    assert project.leftovers() == {"container": [], "network": [], "volume": []}
