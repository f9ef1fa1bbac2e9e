"""cluster/connection.py without a Redis: which run, user and addresses each source gives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from canopy import config as config_mod
from canopy.cluster import cli, connection
from canopy.errors import UserError


def parse(*argv: str):
    return cli.build_parser().parse_args(["status", *argv])


def deployment_toml(tmp_path: Path) -> Path:
    """A compose-like cluster TOML: its run name, its shards by service name, role users on."""
    cfg = config_mod.load(
        None,
        [
            'run.name="compose"',
            'cluster.redis=["redis0:6379", "redis1:6379"]',
            'cluster.password_file="/run/secrets/canopy/redis.password"',
            "cluster.role_users=true",
        ],
    )
    path = tmp_path / "cluster.toml"
    config_mod.save(cfg, path)
    return path


def test_a_toml_names_the_run_and_its_readers_are_the_status_user(tmp_path: Path) -> None:
    target = connection.resolve(parse("--config", str(deployment_toml(tmp_path))))
    assert target.keys.run == "compose" and target.run_dir is None and target.has_config
    assert target.cfg.cluster.redis == ["redis0:6379", "redis1:6379"]
    assert target.cfg.cluster.role_users  # so `status`, `export`... log in as the status user


def test_flags_override_the_toml_and_name_exactly_one_user(tmp_path: Path) -> None:
    password = tmp_path / "status.password"
    argv = [
        "--config",
        str(deployment_toml(tmp_path)),
        "--redis",
        "127.0.0.1:6379",
        "--redis",
        "127.0.0.1:6380",
    ]
    target = connection.resolve(parse(*argv, "--password-file", str(password), "--user", "status"))
    c = target.cfg.cluster
    assert c.redis == ["127.0.0.1:6379", "127.0.0.1:6380"] and target.keys.run == "compose"
    assert (c.redis_user, c.password_file, c.role_users) == ("status", str(password), False)


def test_a_run_directory_lists_its_processes_and_refuses_a_toml_beside_it(tmp_path: Path) -> None:
    toml = deployment_toml(tmp_path)
    run = {
        "run": "r1",
        "config": str(toml),
        "roles": {"actor": [{"id": 0}, {"id": 2}], "learner": [{"id": 0}]},
    }
    (tmp_path / "cluster.json").write_text(json.dumps(run))
    target = connection.resolve(parse(), tmp_path)
    assert target.keys.run == "r1" and target.run_dir == tmp_path
    assert sorted(target.listed) == [("actor", 0), ("actor", 2), ("learner", 0)]
    with pytest.raises(UserError, match="not both"):
        connection.resolve(parse("--config", str(toml)), tmp_path)


@pytest.mark.parametrize(
    "content, problem",
    [(None, "not found"), ("[1, 2", "not a cluster.json"), ('{"config": "x"}', "not a cluster.json")],
)
def test_a_directory_that_is_not_a_run_is_a_one_line_error(tmp_path: Path, content, problem: str) -> None:
    if content is not None:
        (tmp_path / "cluster.json").write_text(content)
    with pytest.raises(UserError, match=problem):
        connection.resolve(parse(), tmp_path)


def test_up_takes_the_connection_only_with_resume() -> None:
    assert cli.main(["up", "--redis", "127.0.0.1:6379"]) == 2
    assert cli.main(["up", "--resume", "--redis", "127.0.0.1:6379", "--env", "Acrobot-v1"]) == 2
