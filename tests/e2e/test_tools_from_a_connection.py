"""The operator tools against a live run given only its Redis addresses and a password file.

A real `canopy up` trains CartPole; its cluster.json is then moved out of sight (the roles
keep writing logs and snapshots in the run directory, so it stays), and `canopy status`,
`plot`, `export`, `eval` and `checkpoint list` run from another working directory with
`--redis ... --password-file ... --user status` only, as against a compose, Kubernetes or
Ray deployment. Then `canopy up --resume` with the same options continues
that run on new local shards from its newest checkpoint, while the first still runs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from conftest import REPO_ROOT, stop_process, wait_for

from canopy.keys import Keys
from canopy.version import Version

SETTINGS = [
    "checkpoint.every_s=1.0",
    "checkpoint.standby=false",
    "actors.count=1",
    "replay.min_size=300",
    "learner.publish_every=20",
    "run.heartbeat_s=1.0",
]
UP_S = 120  # start-up of a whole local cluster on a loaded 2-core machine


def env() -> dict[str, str]:
    out = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    out.pop("CANOPY_PARENT_PID", None)
    return out


def start(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    """`canopy ARGS` in `cwd`, in its own session, stderr to `log`."""
    with open(log, "wb") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "canopy.cluster.cli", *args],
            cwd=cwd,
            env=env(),
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )


def ran(args: list[str], cwd: Path) -> str:
    """The output of `canopy ARGS` run in `cwd`, which must succeed."""
    done = subprocess.run(
        [sys.executable, "-m", "canopy.cluster.cli", *args],
        cwd=cwd,
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def wait_up(proc: subprocess.Popen, run_dir: Path, log: Path) -> dict:
    cluster_json = run_dir / "cluster.json"
    wait_for(lambda: cluster_json.exists() or proc.poll() is not None, UP_S, 0.2, "cluster.json")
    assert proc.poll() is None, log.read_text()[-2000:]
    return json.loads(cluster_json.read_text())


def client(cluster: dict, password_file: Path, user: str) -> redis.Redis:
    root = cluster["redis"][0]
    password = password_file.read_text().strip()
    return redis.Redis(
        host=root["host"], port=root["port"], username=user, password=password, socket_timeout=5
    )


@pytest.mark.slow
def test_tools_and_resume_need_only_an_address_and_a_password_file(tmp_path: Path) -> None:
    run_dir, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    cluster_json, hidden = run_dir / "cluster.json", tmp_path / "cluster.json.away"
    elsewhere.mkdir()
    first_log, second_log = tmp_path / "first.err", tmp_path / "second.err"
    procs: list[subprocess.Popen] = []
    clients: list[redis.Redis] = []
    try:
        settings = [x for s in SETTINGS for x in ("--set", s)]
        args = ["up", "--time-limit", "400", "--stop-at-return", "100000", "--run-dir", str(run_dir)]
        procs.append(start([*args, *settings], tmp_path, first_log))
        cluster = wait_up(procs[0], run_dir, first_log)
        # What an operator of a deployment holds: the shards' addresses and the read-only
        # user's password (compose: the canopy-secrets volume), nothing of the run directory.
        password = elsewhere / "status.password"
        shutil.copy(Path(cluster["password_file"]).with_name("redis.status.password"), password)
        conn = [x for e in cluster["redis"] for x in ("--redis", f"{e['host']}:{e['port']}")]
        conn += ["--password-file", str(password), "--user", "status"]
        keys = Keys(cluster["run"])
        r = client(cluster, password, "status")
        clients.append(r)
        wait_for(
            lambda: r.zcard(keys.ckpt_index) and r.get(keys.model_latest) and r.xlen(keys.metrics) >= 3,
            UP_S,
            0.2,
            "a checkpoint, a published version and three metrics samples",
        )
        cluster_json.rename(hidden)

        table = ran(["status", *conn], elsewhere)
        assert "learner" in table and "actor" in table and "policy lag" in table
        ran(["plot", *conn, "--out", "curves.png"], elsewhere)
        assert (elsewhere / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        ran(["export", *conn, "--version", "newest", "--out", "p.safetensors"], elsewhere)
        scored = json.loads(
            ran(["eval", *conn, "--version", "newest", "--episodes", "2"], elsewhere).splitlines()[-1]
        )
        assert scored["env"] == "CartPole-v1" and scored["episodes"] == 2
        newest = r.zrevrange(keys.ckpt_index, 0, 0)[0].decode()
        assert newest.split(".")[0] in ran(["checkpoint", "list", *conn], elsewhere)

        second_dir = tmp_path / "continued"
        procs.append(start(["up", "--resume", *conn, "--run-dir", str(second_dir)], elsewhere, second_log))
        second = wait_up(procs[1], second_dir, second_log)
        assert second["run"] == cluster["run"] and second["redis"] != cluster["redis"]
        r2 = client(second, Path(second["password_file"]), second["redis_user"])
        clients.append(r2)

        def learner_event(kind: str) -> dict[str, str] | None:
            for _, fields in r2.xrange(keys.events, count=10_000):
                event = {k.decode(): v.decode() for k, v in fields.items()}
                if event.get("kind") == kind and event.get("role") == "learner":
                    return event
            return None

        begun = wait_for(lambda: learner_event("start"), UP_S, 0.2, "the continued learner to start")
        restored = Version.parse(learner_event("restore")["ckpt"])
        assert restored <= Version.parse(r.zrevrange(keys.ckpt_index, 0, 0)[0])  # one the first run committed
        assert restored.step > 0 and Version.parse(begun["version"]).epoch > restored.epoch
        wait_for(
            lambda: int(r2.hget(keys.proc("learner", 0), "updates_total") or 0) > restored.step,
            UP_S,
            0.2,
            "the continued learner to train past its checkpoint",
        )
        procs[1].send_signal(signal.SIGTERM)
        assert procs[1].wait(timeout=90) == 0, second_log.read_text()[-2000:]
        assert json.loads((second_dir / "summary.json").read_text())["resumed"] is True
    finally:
        for c in clients:
            c.close()
        if hidden.exists():
            hidden.rename(cluster_json)
        for proc in procs:
            stop_process(proc, timeout=90)
