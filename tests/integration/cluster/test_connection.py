"""cluster/connection.py and the operator tools against a real redis-server, given only its
address and a password file: no run directory anywhere, as under compose, Kubernetes or Ray.

The run's keys are written the way its roles write them: a learner's `MetricsWriter`
(learner/metrics.py) leaves the run's config and metrics samples, a publisher the policy,
telemetry the stats hashes and liveness sets.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch
from conftest import RedisServer

from canopy import config as config_mod
from canopy.cache import blob
from canopy.cluster import cli, connection, status
from canopy.cluster.plot import load_stream
from canopy.errors import UserError
from canopy.keys import Keys
from canopy.learner.metrics import MetricsWriter
from canopy.learner.network import ARCH, QNetwork
from canopy.learner.publisher import Publisher
from canopy.version import Version


@pytest.fixture
def away(tmp_path: Path) -> Iterator[Path]:
    """A working directory with nothing of the run in it."""
    here = Path.cwd()
    os.chdir(tmp_path)
    try:
        yield tmp_path
    finally:
        os.chdir(here)


def flags(server: RedisServer, *extra: str) -> list[str]:
    return ["--redis", f"{server.host}:{server.port}", "--password-file", str(server.password_file), *extra]


def resolve(argv: list[str], run_dir: str | None = None) -> connection.Target:
    parser = cli.build_parser()
    return connection.resolve(parser.parse_args(["status", *argv]), run_dir)


def started_learner(r: redis.Redis, keys: Keys, env: str = "CartPole-v1") -> MetricsWriter:
    """What a learner leaves when it takes the lease: its config, then one sample per beat."""
    cfg = config_mod.load(None, [f'run.name="{keys.run}"', f'env.id="{env}"', "redis.shards=2"])
    writer = MetricsWriter(r, keys, cfg, {"updates_total": 0, "loss": 0.5, "policy_version": "1.0"})
    writer.start()
    writer.close()  # the samples below are written by hand, at chosen counts
    return writer


def actor_reports(r: redis.Redis, keys: Keys, ident: int, steps: int, episodes: int, ret: float) -> None:
    now = time.time()
    r.hset(
        keys.proc("actor", ident),
        mapping={
            "state": "running",
            "started_at": now - 10,
            "updated_at": now,
            "env_steps_total": steps,
            "episodes_total": episodes,
            "episode_return_mean": ret,
        },
    )
    r.zadd(keys.alive("actor"), {str(ident): now + 60})


def test_an_address_and_a_password_file_find_the_only_run_and_its_stored_config(
    redis_server: RedisServer, redis_client: redis.Redis, run_keys: Keys, away: Path
) -> None:
    with pytest.raises(UserError, match="--run NAME"):
        resolve(flags(redis_server))  # nothing has started: no run to find
    started_learner(redis_client, run_keys, env="Acrobot-v1")
    target = resolve(flags(redis_server))
    assert target.keys.run == run_keys.run and target.has_config and target.run_dir is None
    assert target.cfg.env.id == "Acrobot-v1" and target.cfg.redis.shards == 2
    # The connection is the one given, not the one the run's config names.
    assert target.cfg.cluster.redis == [f"{redis_server.host}:{redis_server.port}"]
    assert target.cfg.cluster.redis_user == "canopy" and not target.cfg.cluster.role_users


def test_a_run_with_no_config_yet_is_read_with_defaults_and_tools_that_need_it_refuse(
    redis_server: RedisServer, redis_client: redis.Redis, run_keys: Keys, away: Path
) -> None:
    target = resolve(flags(redis_server, "--run", run_keys.run))
    assert not target.has_config
    with pytest.raises(UserError, match="needs the run's config"):
        connection.require_config(target, "export")
    assert cli.main(["export", *flags(redis_server, "--run", run_keys.run), "--out", "p.safetensors"]) == 2


@pytest.mark.parametrize(
    "argv, problem",
    [
        (["--redis", "nohost"], "expected HOST:PORT"),
        (["--redis", "h:99999", "--password-file", "x"], "expected HOST:PORT"),
        (["--redis", "127.0.0.1:1"], "no Redis password"),
        ([], "which run"),
    ],
)
def test_bad_connection_flags_are_one_line_errors(argv: list[str], problem: str) -> None:
    with pytest.raises(UserError, match=problem):
        resolve(argv)


def test_status_lists_the_processes_of_the_liveness_sets_without_cluster_json(
    redis_server: RedisServer, redis_client: redis.Redis, run_keys: Keys, away: Path
) -> None:
    started_learner(redis_client, run_keys)
    actor_reports(redis_client, run_keys, 0, steps=500, episodes=5, ret=20.0)
    actor_reports(redis_client, run_keys, 1, steps=700, episodes=0, ret=0.0)
    redis_client.zadd(run_keys.alive("actor"), {"1": time.time() - 5})  # missed its deadline
    redis_client.zadd(run_keys.alive("actor"), {"not-an-id": time.time() + 60})  # ignored
    rows, healthy, _ = status.read(resolve(flags(redis_server, "--run", run_keys.run)))
    assert [(r["role"], r["id"], r["alive"]) for r in rows] == [("actor", 0, True), ("actor", 1, False)]
    assert not healthy
    code = cli.main(["status", *flags(redis_server, "--run", run_keys.run)])
    assert code == 1  # actor 1 is dead: the health check fails


def test_the_metrics_stream_sums_live_actors_and_is_what_plot_draws(
    redis_server: RedisServer, redis_client: redis.Redis, run_keys: Keys, away: Path
) -> None:
    writer = started_learner(redis_client, run_keys)
    for beat in range(1, 8):
        actor_reports(redis_client, run_keys, 0, steps=1000 * beat, episodes=beat, ret=10.0 * beat)
        actor_reports(redis_client, run_keys, 1, steps=500 * beat, episodes=beat, ret=30.0 * beat)
        writer.counters.update(updates_total=50 * beat, policy_version=f"1.{beat}")
        writer.write()
    redis_client.hset(run_keys.proc("actor", 0), "env_steps_total", "many")  # garbage is skipped
    writer.write()
    redis_client.xadd(run_keys.metrics, {"t": "nan", "env_steps": "1"})  # a forged entry: no time
    assert writer.errors == 0
    rows = load_stream(redis_client, run_keys)
    assert len(rows) == 8
    assert [r["env_steps"] for r in rows[:7]] == [1500.0 * b for b in range(1, 8)]
    assert rows[6]["train_return"] == pytest.approx(140.0) and rows[6]["updates"] == 350.0
    assert rows[7]["env_steps"] == 3500.0  # actor 1 only
    walls = [r["wall_s"] for r in rows]
    assert walls[0] == 0.0 and walls == sorted(walls)

    assert cli.main(["plot", *flags(redis_server, "--run", run_keys.run), "--out", "curves.png"]) == 0
    assert (away / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_export_and_eval_take_the_best_confirmed_policy_from_a_connection(
    redis_server: RedisServer, redis_client: redis.Redis, run_keys: Keys, away: Path, capsys
) -> None:
    started_learner(redis_client, run_keys)
    torch.manual_seed(0)
    publisher = Publisher(redis_client, run_keys, learner_id=0, keep=2)
    publisher.publish(QNetwork(4, 2, [16]).export(), step=3, arch=ARCH)
    manifest, chunks = blob.read(redis_client, run_keys, Version(publisher.epoch, 3))
    blob.pin(redis_client, run_keys, blob.unpack(manifest, chunks), manifest, {"mean": 9.0, "episodes": 100})
    publisher.publish(QNetwork(4, 2, [16]).export(), step=5, arch=ARCH)

    argv = flags(redis_server, "--run", run_keys.run)
    assert cli.main(["export", *argv, "--out", "best.safetensors"]) == 0
    from safetensors import safe_open

    with safe_open("best.safetensors", framework="numpy") as f:
        meta = f.metadata()
    assert meta["version"] == f"{publisher.epoch}.3" and meta["env"] == "CartPole-v1"
    capsys.readouterr()
    assert cli.main(["eval", *argv, "--version", "newest", "--episodes", "2"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["version"] == f"{publisher.epoch}.5" and result["episodes"] == 2
    assert cli.main(["eval", "best.safetensors", "--episodes", "1"]) == 0  # a file still works alone
