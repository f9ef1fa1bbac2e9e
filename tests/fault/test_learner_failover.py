"""Killing the learner of a real `canopy up` run: the warm standby takes over from the newest
checkpoint, for off-policy learners (dqn on CartPole, sac on Pendulum) and an on-policy one
(ppo) alike."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from conftest import REPO_ROOT, pid_alive, stop_process, wait_for

from canopy.version import Version

pytestmark = [pytest.mark.fault, pytest.mark.slow]


# What an evaluation of the resumed learner must reach (the off-policy dqn is not asked).
IMPROVED = {"ppo": 200.0, "sac": -400.0}


def events(r: redis.Redis, prefix: str) -> list[dict[str, str]]:
    return [
        {k.decode(): v.decode() for k, v in fields.items()}
        for _, fields in r.xrange(prefix + "events", count=100_000)
    ]


@pytest.mark.parametrize("algorithm", ["dqn", "ppo", "sac"])
def test_killing_the_learner_of_a_local_run_is_survived_by_the_standby_from_the_last_checkpoint(
    tmp_path: Path, algorithm: str
) -> None:
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("CANOPY_PARENT_PID", None)
    cmd = [sys.executable, "-m", "canopy.cluster.cli", "up", "--time-limit", "120", "--run-dir", str(run_dir)]
    cmd += ["--set", "checkpoint.every_s=1.0", "--set", "checkpoint.restart_backoff_s=0.2"]
    cmd += ["--set", "actors.count=1", "--set", f'learner.algorithm="{algorithm}"']
    if algorithm == "dqn":
        cmd += ["--set", "replay.min_size=500"]
    if algorithm == "sac":
        cmd += ["--set", 'env.id="Pendulum-v1"']
    with open(tmp_path / "stderr", "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=REPO_ROOT)
    r = None
    try:
        wait_for(
            lambda: (run_dir / "cluster.json").exists() or proc.poll() is not None, 120, 0.1, "cluster.json"
        )
        assert proc.poll() is None, (tmp_path / "stderr").read_text()[-2000:]
        cluster = json.loads((run_dir / "cluster.json").read_text())
        prefix = cluster["key_prefix"]
        learners = {e["id"]: e for e in cluster["roles"]["learner"]}
        assert learners[1].get("standby") is True
        r = redis.Redis(
            host=cluster["redis"][0]["host"],
            port=cluster["redis"][0]["port"],
            username=cluster["redis_user"],
            password=Path(cluster["password_file"]).read_text().strip(),
        )
        commit = wait_for(
            lambda: next((e for e in events(r, prefix) if e["kind"] == "checkpoint_commit"), None),
            90,
            0.1,
            "a committed checkpoint",
        )
        # The standby warms up (imports torch, builds the model) once there is a checkpoint to
        # take over from (learner/standby.py): kill only a learner whose standby is warm.
        wait_for(lambda: r.hget(prefix + "proc:learner:1", "state") == b"standby", 60, 0.1, "a warm standby")
        before = Version.parse(r.get(prefix + "model:latest"))
        os.kill(learners[0]["pid"], signal.SIGKILL)
        t_kill = time.monotonic()
        after = wait_for(
            lambda: (v := Version.parse(r.get(prefix + "model:latest"))).epoch > before.epoch and v,
            30,
            0.02,
            "a version from a newer epoch",
        )
        recovery_s = time.monotonic() - t_kill
        evs = events(r, prefix)
        restore = next(e for e in evs if e["kind"] == "restore")
        assert Version.parse(restore["ckpt"]) >= Version.parse(commit["ckpt"])
        assert restore["id"] == "1" and any(e["kind"] == "failover" and e["id"] == "1" for e in evs)
        assert after > before and after.step >= Version.parse(commit["ckpt"]).step
        ledger = r.hgetall(prefix + f"ledger:version:{after}")
        assert ledger[b"learner"] == b"1" and ledger[b"checkpoint"].decode() == restore["ckpt"]
        # The launcher brought the dead learner back, as the new standby.
        wait_for(
            lambda: any(e["kind"] == "restart" and e.get("ident") == "0" for e in events(r, prefix)),
            15,
            0.1,
            "restart event",
        )
        assert recovery_s < 15, recovery_s
        print(f"recovery with warm standby: {recovery_s:.2f}s")
        if algorithm in IMPROVED:
            # The resumed learner keeps improving: a policy of the new epoch does far better
            # than a random one (CartPole ~20, Pendulum ~-1200).
            wait_for(
                lambda: any(
                    e["kind"] in ("eval", "confirm")
                    and Version.parse(e["version"]).epoch > before.epoch
                    and float(e["mean_return"]) >= IMPROVED[algorithm]
                    for e in events(r, prefix)
                ),
                90,
                0.2,
                f"an evaluation of {IMPROVED[algorithm]} or more from the new epoch",
            )
    finally:
        if r is not None:
            r.close()
        stop_process(proc, timeout=60)
    assert proc.returncode == 0, (tmp_path / "stderr").read_text()[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stop_reason"] in ("signal", "time_limit")
    for entry in cluster["roles"]["learner"] + cluster["redis"]:
        wait_for(lambda e=entry: not pid_alive(e["pid"]), 10, 0.1, "every process gone")
