"""`canopy checkpoint list` and the resume from a connection (cluster/launcher.py `adopt`,
`commit_adopted`) against a real redis-server holding a learner's committed checkpoint."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import redis
import torch
from conftest import RedisServer

from canopy import config as config_mod
from canopy.cluster import cli, connection
from canopy.cluster.launcher import adopt, commit_adopted
from canopy.config import ClusterConfig, LearnerConfig
from canopy.keys import Keys
from canopy.learner.algorithms.dqn import DQN
from canopy.learner.checkpoint.placement import make_plan
from canopy.learner.checkpoint.state import Capturer
from canopy.learner.checkpoint.store import CheckpointStore
from canopy.learner.metrics import MetricsWriter
from canopy.learner.network import QNetwork
from canopy.lease import Lease
from canopy.version import Version

PLAN = make_plan(["h0"], 1)


def committed_checkpoint(r: redis.Redis, keys: Keys) -> str:
    """What a deployment's learner leaves: its config, then a committed checkpoint at step 7."""
    cfg = config_mod.load(None, [f'run.name="{keys.run}"', "redis.shards=1", "actors.count=5"])
    writer = MetricsWriter(r, keys, cfg, {})
    writer.start()
    writer.close()
    lease = Lease(r, keys, learner=0, ttl_s=60.0)
    assert lease.try_acquire()
    torch.manual_seed(0)
    algo = DQN(QNetwork(4, 2, [16]), LearnerConfig())
    ckpt = f"{lease.epoch}.7"
    store = CheckpointStore([r], keys, PLAN, chunk_bytes=4096)
    store.write(Capturer().capture(algo, {"epoch": lease.epoch}, {}), ckpt, lease.token, 0)
    r.delete(keys.lease)  # the learner stopped
    return ckpt


def test_a_deployments_newest_checkpoint_is_listed_adopted_and_committed_under_a_newer_epoch(
    redis_server: RedisServer, redis_client: redis.Redis, run_keys: Keys, capsys
) -> None:
    ckpt = committed_checkpoint(redis_client, run_keys)
    flags = ["--redis", f"{redis_server.host}:{redis_server.port}", "--password-file"]
    flags += [str(redis_server.password_file), "--run", run_keys.run]
    assert cli.main(["checkpoint", "list", *flags]) == 0
    assert ckpt in capsys.readouterr().out

    target = connection.resolve(cli.build_parser().parse_args(["status", *flags]))
    cfg, loaded = adopt(target, ["learner.lr=0.002"])
    assert loaded.ckpt == ckpt and loaded.snapshot.step == 0
    assert cfg.run.name == run_keys.run and cfg.actors.count == 5 and cfg.learner.lr == 0.002
    assert cfg.cluster == ClusterConfig() and cfg.run.dir == ""  # this machine's, from canopy up

    # The new local shards: here the same server under another run name.
    here = Keys(f"{run_keys.run}-here")
    local = dataclasses.replace(cfg, cluster=redis_server.cluster_config())
    local.run = dataclasses.replace(cfg.run, name=here.run)
    try:
        commit_adopted(local, redis_client, loaded)
        got = CheckpointStore([redis_client], here, PLAN).recover()
        assert got is not None and got.ckpt == ckpt
        assert bytes(got.snapshot.flat.numpy()) == bytes(loaded.snapshot.flat.numpy())
        assert redis_client.get(here.lease) is None  # free for the learner that starts next
        assert int(redis_client.get(here.epoch)) > Version.parse(ckpt).epoch
    finally:
        stale = list(redis_client.scan_iter(match=here.prefix + "*"))
        if stale:
            redis_client.delete(*stale)


def test_a_run_without_a_checkpoint_cannot_be_resumed_from_its_connection(
    redis_server: RedisServer, redis_client: redis.Redis, run_keys: Keys, tmp_path: Path
) -> None:
    writer = MetricsWriter(redis_client, run_keys, config_mod.load(None, [f'run.name="{run_keys.run}"']), {})
    writer.start()  # the learner started, and stopped before its first checkpoint
    writer.close()
    argv = ["up", "--resume", "--redis", f"{redis_server.host}:{redis_server.port}"]
    argv += ["--password-file", str(redis_server.password_file), "--run", run_keys.run]
    argv += ["--run-dir", str(tmp_path / "never")]
    assert cli.main(argv) == 2
    assert not (tmp_path / "never").exists()
