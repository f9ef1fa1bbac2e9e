"""Losing Redis shard 0 (the root: lease, epoch counter, model:latest, events).

With its data gone the epoch still never goes back (the floor from the checkpoint manifests
copied to every shard); in a real `canopy up` run a SIGKILLed root comes back (restarted by
the launcher, on its append-only file) and training goes on with newer versions.
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
import torch
from conftest import REPO_ROOT, stop_process, wait_for
from redis_shards import Shards, shards_fixture

from canopy.config import LearnerConfig
from canopy.keys import Keys
from canopy.learner.algorithms.dqn import DQN
from canopy.learner.checkpoint.placement import make_plan
from canopy.learner.checkpoint.state import Capturer
from canopy.learner.checkpoint.store import CheckpointStore
from canopy.learner.network import QNetwork
from canopy.learner.role import _newest_epoch
from canopy.lease import Lease
from canopy.version import Version

pytestmark = pytest.mark.fault

shards = shards_fixture(3)


def test_a_root_shard_that_lost_its_data_never_hands_out_an_older_epoch(shards: Shards) -> None:
    clients = shards.clients()
    keys = Keys("root-loss")
    store = CheckpointStore(clients, keys, make_plan(["h0", "h1", "h2"], 2), chunk_bytes=4096)
    clients[0].set(keys.epoch, 6)
    first = Lease(clients[0], keys, learner=0, ttl_s=60.0, epoch_floor=lambda: _newest_epoch(store))
    assert first.try_acquire() and first.epoch == 7
    torch.manual_seed(0)
    algo = DQN(QNetwork(4, 2, [32]), LearnerConfig())
    store.write(Capturer().capture(algo, {}, {}), "7.10", first.token, learner=0)

    clients[0].flushall()  # the root restarted without persistence: counter, lease, index gone

    unguarded = Lease(clients[0], keys, learner=1, ttl_s=60.0)
    assert unguarded.try_acquire() and unguarded.epoch == 1, "the failure the floor prevents"
    clients[0].delete(keys.lease)
    second = Lease(clients[0], keys, learner=1, ttl_s=60.0, epoch_floor=lambda: _newest_epoch(store))
    assert second.try_acquire()
    assert second.epoch == 8, "the new epoch must be above every checkpoint's"
    assert int(clients[0].get(keys.epoch)) == 8  # and the counter continues from there
    loaded = store.recover()  # the manifest copies and the other replicas still hold it
    assert loaded is not None and loaded.ckpt == "7.10"


def events(r: redis.Redis, prefix: str) -> list[dict[str, str]]:
    return [
        {k.decode(): v.decode() for k, v in fields.items()}
        for _, fields in r.xrange(prefix + "events", count=100_000)
    ]


@pytest.mark.slow
@pytest.mark.parametrize("persist", [True, False], ids=["aof", "comes-back-empty"])
def test_killing_the_root_shard_of_a_local_run_is_survived_and_versions_keep_increasing(
    tmp_path: Path, persist: bool
) -> None:
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("CANOPY_PARENT_PID", None)
    cmd = [sys.executable, "-m", "canopy.cluster.cli", "up", "--time-limit", "120", "--run-dir", str(run_dir)]
    for item in (
        "checkpoint.every_s=1.0",
        "checkpoint.restart_backoff_s=0.2",
        "actors.count=1",
        "replay.min_size=300",
        "learner.publish_every=20",
        f"redis.persist={str(persist).lower()}",
    ):
        cmd += ["--set", item]
    with open(tmp_path / "stderr", "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=REPO_ROOT)
    r = None
    try:
        wait_for(
            lambda: (run_dir / "cluster.json").exists() or proc.poll() is not None, 120, 0.1, "cluster.json"
        )
        assert proc.poll() is None, (tmp_path / "stderr").read_text()[-2000:]
        cluster = json.loads((run_dir / "cluster.json").read_text())
        prefix, root = cluster["key_prefix"], cluster["redis"][0]
        r = redis.Redis(
            host=root["host"],
            port=root["port"],
            username=cluster["redis_user"],
            password=Path(cluster["password_file"]).read_text().strip(),
            socket_timeout=2,
        )
        wait_for(
            lambda: any(e["kind"] == "checkpoint_commit" for e in events(r, prefix)),
            90,
            0.1,
            "a committed checkpoint",
        )
        before = Version.parse(r.get(prefix + "model:latest"))
        os.kill(root["pid"], signal.SIGKILL)

        def latest() -> Version | None:
            try:
                value = r.get(prefix + "model:latest")
            except redis.ConnectionError:
                return None  # still down: the launcher restarts it after its backoff
            return Version.parse(value) if value is not None else None

        after = wait_for(lambda: (v := latest()) is not None and v > before and v, 60, 0.1, "a newer version")
        later = wait_for(
            lambda: (v := latest()) is not None and v > after and v, 30, 0.1, "versions to go on"
        )
        assert later > after > before
        evs = events(r, prefix)
        assert any(e["kind"] == "restart" and e.get("role") == "redis" for e in evs), "no restart event"
        if persist:  # the stream came back from the append-only file
            assert any(e["kind"] == "start" and e.get("role") == "learner" for e in evs), "events lost"
        else:  # the epoch counter came back from the checkpoints' floor, not from zero
            assert after.epoch > before.epoch, (before, after)
    finally:
        if r is not None:
            r.close()
        stop_process(proc, timeout=60)
    assert proc.returncode == 0, (tmp_path / "stderr").read_text()[-2000:]
