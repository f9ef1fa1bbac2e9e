"""`canopy up --resume RUN_DIR`: a stopped local run continues where it left off.

Two real `canopy up` runs on one run directory: the first trains CartPole until a
checkpoint is committed and is stopped with SIGTERM; the second resumes it. Its Redis
shards come back on their append-only files, the learner restores the newest checkpoint
under a larger epoch and keeps its step counter, and the replay shard starts with the
contents the first run left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from conftest import REPO_ROOT, stop_process, wait_for

from canopy import config as config_mod
from canopy.cluster.launcher import check_resumable
from canopy.config import Config
from canopy.errors import UserError
from canopy.replay.client import request_stats
from canopy.version import Version

SETTINGS = [
    "checkpoint.every_s=1.0",
    "checkpoint.standby=false",  # one learner: every restore event below is the resume's
    "actors.count=1",
    "replay.min_size=300",
    "learner.publish_every=20",
]


def start(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("CANOPY_PARENT_PID", None)
    with open(log, "wb") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "canopy.cluster.cli", "up", *args],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env,
            cwd=REPO_ROOT,
            start_new_session=True,
        )


def root_client(run_dir: Path) -> tuple[redis.Redis, str, dict]:
    cluster = json.loads((run_dir / "cluster.json").read_text())
    root = cluster["redis"][0]
    r = redis.Redis(
        host=root["host"],
        port=root["port"],
        username=cluster["redis_user"],
        password=Path(cluster["password_file"]).read_text().strip(),
        socket_timeout=5,
    )
    return r, cluster["key_prefix"], cluster


def events(r: redis.Redis, prefix: str) -> list[dict[str, str]]:
    return [
        {k.decode(): v.decode() for k, v in fields.items()}
        for _, fields in r.xrange(prefix + "events", count=100_000)
    ]


def wait_up(proc: subprocess.Popen, run_dir: Path, log: Path) -> None:
    cluster_json = run_dir / "cluster.json"
    started = cluster_json.stat().st_mtime if cluster_json.exists() else 0.0
    wait_for(
        lambda: (cluster_json.exists() and cluster_json.stat().st_mtime > started) or proc.poll() is not None,
        90,
        0.1,
        "cluster.json",
    )
    assert proc.poll() is None, log.read_text()[-2000:]


def stop(proc: subprocess.Popen, log: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"canopy up still running 60 s after SIGTERM: {log.read_text()[-2000:]}")
    assert code == 0, log.read_text()[-2000:]


@pytest.mark.slow
def test_a_stopped_run_resumes_from_its_checkpoint_with_a_new_epoch_and_its_replay_contents(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    first_log, second_log = tmp_path / "first.err", tmp_path / "second.err"
    procs: list[subprocess.Popen] = []
    clients: list[redis.Redis] = []
    try:
        args = ["--time-limit", "300", "--run-dir", str(run_dir)]
        procs.append(start([*args, *(x for s in SETTINGS for x in ("--set", s))], first_log))
        wait_up(procs[0], run_dir, first_log)
        r, prefix, _ = root_client(run_dir)
        clients.append(r)
        wait_for(
            lambda: any(
                e["kind"] == "checkpoint_commit" and Version.parse(e["ckpt"]).step > 0
                for e in events(r, prefix)
            ),
            90,
            0.1,
            "a checkpoint of a trained learner",
        )
        stop(procs[0], first_log)
        first = json.loads((run_dir / "summary.json").read_text())
        assert first["resumed"] is False and first["epoch"] >= 1

        procs.append(start(["--resume", str(run_dir), "--time-limit", "300"], second_log))
        wait_up(procs[1], run_dir, second_log)
        r, prefix, cluster = root_client(run_dir)
        clients.append(r)
        # Replay contents first, before new inserts could explain them: a shard that restored
        # holds more items than it has been sent since it started.
        replay = request_stats(cluster["roles"]["replay"][0]["endpoints"]["replay"])
        commits = [Version.parse(e["ckpt"]) for e in events(r, prefix) if e["kind"] == "checkpoint_commit"]
        commits = [v for v in commits if v.epoch <= first["epoch"]]  # the first run's
        assert commits, "the first run's events did not survive the restart"

        def resumed_start() -> dict[str, str] | None:
            found = [
                e
                for e in events(r, prefix)
                if e["kind"] == "start" and e["role"] == "learner" and int(e["epoch"]) > first["epoch"]
            ]
            return found[0] if found else None

        begun = wait_for(resumed_start, 60, 0.1, "the resumed learner to start")
        evs = events(r, prefix)
        restore = next(e for e in evs if e["kind"] == "restore" and e.get("epoch") == begun["epoch"])
        replay_restore = [e for e in evs if e["kind"] == "restore" and e["role"] == "replay"]
        restored = Version.parse(restore["ckpt"])
        assert restored == max(commits), "not the newest checkpoint of the first run"
        version = Version.parse(begun["version"])
        assert version.epoch > restored.epoch and version.step == restored.step, (begun, restore)
        wait_for(
            lambda: int(r.hget(prefix + "proc:learner:0", "updates_total") or 0) > restored.step,
            60,
            0.1,
            "the resumed learner to train past its checkpoint",
        )
        stop(procs[1], second_log)
        second = json.loads((run_dir / "summary.json").read_text())
        assert second["resumed"] is True and second["run"] == first["run"]
        assert second["updates"] > restored.step
    finally:
        for r in clients:
            r.close()
        for proc in procs:
            stop_process(proc, timeout=60)
    saved = first["replay_snapshots"]
    assert saved and saved[0].get("ok") and "error" not in saved[0], saved
    assert replay_restore and int(replay_restore[-1]["items"]) > 0, replay_restore
    assert replay["items"] > replay["inserts_total"], f"the replay shard restored nothing: {replay}"


def user_error(args: list[str], cwd: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("CANOPY_PARENT_PID", None)
    done = subprocess.run(
        [sys.executable, "-m", "canopy.cluster.cli", "up", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=60,
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("canopy: "), done.stderr
    return lines[0]


def a_stopped_run(tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = Config()
    cfg.run.name, cfg.run.dir = "stopped", str(run_dir)
    config_mod.save(cfg, run_dir / "config.toml")
    return run_dir


def test_resume_refuses_a_directory_that_is_not_a_run_or_other_run_settings(tmp_path: Path) -> None:
    assert "no config.toml" in user_error(["--resume", str(tmp_path / "nothing")], tmp_path)
    run_dir = a_stopped_run(tmp_path)
    assert "--env" in user_error(["--resume", str(run_dir), "--env", "Acrobot-v1"], tmp_path)
    # Repeating the run's own env id is fine (scripts/up.sh always passes one): on to the next check.
    assert "nothing to resume" in user_error(["--resume", str(run_dir), "--env", "CartPole-v1"], tmp_path)


def test_resume_refuses_a_run_without_redis_data_and_one_still_running(tmp_path: Path) -> None:
    run_dir = a_stopped_run(tmp_path)
    assert "nothing to resume" in user_error(["--resume", str(run_dir)], tmp_path)
    assert not (run_dir / "logs").exists(), "a refused resume started something"

    cfg = config_mod.load(run_dir / "config.toml")
    (run_dir / "redis-0" / "appendonlydir").mkdir(parents=True)
    (run_dir / "redis-0" / "appendonlydir" / "appendonly.aof.1.base.rdb").write_bytes(b"x")
    check_resumable(cfg, run_dir)  # data there, nothing running: fine
    # A live process of this run (its command line names cluster.cli, as every role's does).
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "cluster.cli"])
    try:
        cmdline = Path(f"/proc/{live.pid}/cmdline")
        wait_for(lambda: b"cluster.cli" in cmdline.read_bytes(), 10, 0.01, "the process to exec")
        (run_dir / "cluster.json").write_text(json.dumps({"redis": [{"pid": live.pid}], "roles": {}}))
        with pytest.raises(UserError, match=f"still running \\(pid {live.pid}\\)"):
            check_resumable(cfg, run_dir)
    finally:
        stop_process(live, timeout=5)
