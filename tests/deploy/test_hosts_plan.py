"""`canopy hosts plan` and the per-role scripts: the bare-metal commands, checked offline.

The plan must give every role process of the config exactly once, on the host of its
address (or where --place puts it), as commands the real `canopy` parser accepts; the
launcher builds its commands with the same function.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT

from canopy import config as config_mod
from canopy.cluster import hostplan
from canopy.cluster.cli import build_parser
from canopy.errors import UserError
from canopy.lease import follower_rank

DEPLOY_CONFIG = REPO_ROOT / "deploy" / "cluster.toml"
SCRIPTS = REPO_ROOT / "scripts"


def canopy(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "canopy.cluster.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )


def test_listening_roles_go_to_their_address_and_placed_roles_round_robin() -> None:
    cfg = config_mod.load(DEPLOY_CONFIG)
    placement = hostplan.parse_placement(["learner=gpu0,gpu1", "actor=cpu0,cpu1"])
    hosts = hostplan.plan(cfg, "c.toml", placement)
    assert list(hosts)[:2] == ["redis0", "redis1"], "Redis hosts come first"
    as_text = {host: [" ".join(c[1:]) for c in cmds] for host, cmds in hosts.items()}
    assert as_text["replay0"] == ["replay --config c.toml --id 0"]
    assert as_text["cache0"] == ["cache --config c.toml --id 0"]
    assert as_text["gpu0"] == ["learner --config c.toml --id 0"]
    assert as_text["gpu1"] == ["learner --config c.toml --id 1 --standby"]
    assert as_text["cpu0"] == ["actor --config c.toml --id 0"]
    assert as_text["cpu1"] == ["actor --config c.toml --id 1"]
    assert as_text[hostplan.UNPLACED] == ["evaluator --config c.toml --id 0"]


def test_a_learner_group_plans_its_followers_as_ranks_and_the_standby_after_them() -> None:
    cfg = config_mod.load(DEPLOY_CONFIG, ["learner.learners=3"])
    with pytest.raises(UserError, match=r"cluster\.learner_store"):
        hostplan.plan(cfg, "c.toml", {})
    cfg.cluster.learner_store = "gpu0:29500"
    hosts = hostplan.plan(cfg, "c.toml", hostplan.parse_placement(["learner=gpu0,gpu1,gpu2"]))
    as_text = {host: [" ".join(c[1:]) for c in cmds] for host, cmds in hosts.items()}
    assert as_text["gpu0"] == ["learner --config c.toml --id 0", "learner --config c.toml --id 3 --standby"]
    assert as_text["gpu1"] == ["learner --config c.toml --id 1"]
    assert as_text["gpu2"] == ["learner --config c.toml --id 2"]
    assert [follower_rank(3, i) for i in range(4)] == [None, 1, 2, None]


def test_every_planned_command_parses_with_the_real_cli_and_runs_each_process_once() -> None:
    cfg = config_mod.load(DEPLOY_CONFIG)
    hosts = hostplan.plan(cfg, str(DEPLOY_CONFIG), {})
    parser = build_parser()
    seen = []
    for commands in hosts.values():
        for cmd in commands:
            assert cmd[0] == "canopy"
            args = parser.parse_args(cmd[1:])
            seen.append((args.command, args.id))
    expected = [(role, ident) for role, ident, _ in hostplan.role_processes(cfg)]
    assert sorted(seen) == sorted(expected) and len(seen) == len(set(seen))


def test_a_config_without_addresses_or_a_bad_placement_is_one_clear_line(tmp_path: Path) -> None:
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    with pytest.raises(UserError, match=r"no address for redis, replay, cache_fetch, cache_notify"):
        hostplan.plan(config_mod.load(empty), str(empty), {})
    nameless = tmp_path / "nameless.toml"
    nameless.write_text(DEPLOY_CONFIG.read_text().replace('name = "compose"', 'name = ""'))
    with pytest.raises(UserError, match=r"must set run.name"):
        hostplan.plan(config_mod.load(nameless), str(nameless), {})
    result = canopy("hosts", "plan", str(DEPLOY_CONFIG), "--place", "replay=h1")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "cannot place replay" in result.stderr
    result = canopy("hosts", "plan", str(DEPLOY_CONFIG), "--place", "actor")
    assert result.returncode == 2 and "must look like ROLE=HOST" in result.stderr


def test_the_cli_and_its_script_print_shell_lines_per_host() -> None:
    result = canopy("hosts", "plan", str(DEPLOY_CONFIG), "--place", "actor=10.0.0.9")
    script = subprocess.run(
        ["bash", str(SCRIPTS / "cluster-commands.sh"), str(DEPLOY_CONFIG), "--place", "actor=10.0.0.9"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert script.stdout == result.stdout
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert f"# 10.0.0.9\ncanopy actor --config {DEPLOY_CONFIG} --id 0 &" in text
    assert text.index("# redis0") < text.index("# replay0") < text.index("# 10.0.0.9")


@pytest.mark.parametrize(
    ("script", "args", "message"),
    [
        ("actor.sh", ["cfg"], "expected CONFIG and ID"),
        ("actor.sh", [str(DEPLOY_CONFIG), "x"], "ID must be a non-negative integer"),
        ("actor.sh", [str(DEPLOY_CONFIG), "0", "--standby"], "--standby is for the learner only"),
        ("learner-standby.sh", ["missing.toml", "1"], "config file 'missing.toml' not found"),
        ("cluster-commands.sh", [], "expected CONFIG"),
    ],
)
def test_role_scripts_reject_bad_arguments_in_one_line(script: str, args: list[str], message: str) -> None:
    result = subprocess.run(
        ["bash", str(SCRIPTS / script), *args], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert message in result.stderr and result.stderr.count("\n") == 1


def test_the_standby_script_runs_the_learner_with_standby(tmp_path: Path) -> None:
    # A stand-in `canopy` first on PATH records what the script would exec.
    fake = tmp_path / "canopy"
    fake.write_text('#!/bin/sh\necho "$@"\n')
    fake.chmod(0o755)
    result = subprocess.run(
        ["bash", str(SCRIPTS / "learner-standby.sh"), str(DEPLOY_CONFIG), "1", "--set", "learner.lr=1e-4"],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": f"{tmp_path}:/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    args = build_parser().parse_args(result.stdout.split())
    assert (args.command, args.id, args.standby, args.set) == ("learner", 1, True, ["learner.lr=1e-4"])
