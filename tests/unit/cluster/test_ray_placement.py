"""Where `canopy up --ray` puts each role (cluster/ray_launch.py), from `ray.nodes()`-shaped records.

No Ray needed: the placement is plain functions of the node list; tests/deploy/test_ray_cluster.py
runs it on a real Ray cluster.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from canopy import config as config_mod
from canopy.cluster import ray_launch
from canopy.cluster.ray_launch import Node
from canopy.errors import UserError


def ray_node(
    ip: str, head: bool = False, gpus: float = 0, alive: bool = True, **offers: float
) -> dict[str, Any]:
    resources: dict[str, float] = {
        "CPU": 4.0,
        f"node:{ip}": 1.0,
        **{f"canopy_{k}": v for k, v in offers.items()},
    }
    if head:
        resources["node:__internal_head__"] = 1.0
    if gpus:
        resources["GPU"] = gpus
    return {"NodeID": f"id-{ip}", "NodeManagerAddress": ip, "Alive": alive, "Resources": resources}


def ports_from(start: int) -> Any:
    """A `ports_on` that hands out distinct ports and records how many each node was asked for."""
    asked: dict[str, int] = {}
    counter = iter(range(start, start + 1000))

    def ports_on(node: Node, count: int) -> list[int]:
        asked[node.ip] = asked.get(node.ip, 0) + count
        return [next(counter) for _ in range(count)]

    ports_on.asked = asked  # type: ignore[attr-defined]
    return ports_on


# What `prepare` sets before the plan is made.
PREPARED = ['run.name="t"', 'cluster.password_file="run/redis.password"']


def test_nodes_come_head_first_then_by_address_and_dead_ones_are_left_out() -> None:
    nodes = ray_launch.nodes_of(
        [
            ray_node("10.0.0.10"),
            ray_node("10.0.0.9"),
            ray_node("10.0.0.1", head=True),
            ray_node("10.0.0.5", alive=False),
        ]
    )
    assert [n.ip for n in nodes] == ["10.0.0.1", "10.0.0.9", "10.0.0.10"]
    assert nodes[0].head and not nodes[1].head


def test_without_offers_the_shards_take_turns_over_every_node_and_listen_on_its_address() -> None:
    cfg = config_mod.load(None, ["redis.shards=2", "replay.shards=2", "cache.nodes=1"])
    nodes = ray_launch.nodes_of([ray_node(f"10.0.0.{i}", head=i == 1) for i in (1, 2, 3)])
    ports_on = ports_from(7000)
    ray_launch.assign_addresses(cfg, nodes, ports_on)
    c = cfg.cluster
    assert [a.rpartition(":")[0] for a in c.redis] == ["10.0.0.1", "10.0.0.2"]
    assert [a.rpartition(":")[0] for a in c.replay] == ["tcp://10.0.0.3", "tcp://10.0.0.1"]
    assert c.cache_fetch[0].startswith("tcp://10.0.0.2:") and c.cache_notify[0].startswith("tcp://10.0.0.2:")
    ports = [int(a.rpartition(":")[2]) for a in [*c.redis, *c.replay, *c.cache_fetch, *c.cache_notify]]
    assert len(set(ports)) == len(ports)
    assert ports_on.asked == {"10.0.0.1": 2, "10.0.0.2": 3, "10.0.0.3": 1}  # one ask per node
    assert c.learner_store == ""


def test_offers_pin_roles_to_nodes_and_learners_prefer_gpus() -> None:
    cfg = config_mod.load(None, [*PREPARED, "redis.shards=2", "actors.count=3", "learner.learners=1"])
    nodes = ray_launch.nodes_of(
        [
            ray_node("10.0.0.1", head=True, redis=1),
            ray_node("10.0.0.2", replay=1, cache=1, evaluator=1),
            ray_node("10.0.0.3", gpus=1),
            ray_node("10.0.0.4", gpus=2),
            ray_node("10.0.0.5", actor=1),
            ray_node("10.0.0.6", actor=1),
        ]
    )
    ray_launch.assign_addresses(cfg, nodes, ports_from(7000))
    assert all(a.startswith("10.0.0.1:") for a in cfg.cluster.redis)
    plan = ray_launch.node_plan(cfg, "run/config.toml", nodes)
    where = {key: node.ip for key, node in plan.items()}
    assert where[("redis", 0)] == where[("redis", 1)] == "10.0.0.1"
    assert where[("replay", 0)] == where[("cache", 0)] == where[("evaluator", 0)] == "10.0.0.2"
    # Learner 0 on the first GPU node, the standby (id 1) on the second.
    assert (where[("learner", 0)], where[("learner", 1)]) == ("10.0.0.3", "10.0.0.4")
    assert [where[("actor", i)] for i in range(3)] == ["10.0.0.5", "10.0.0.6", "10.0.0.5"]


def test_a_learner_group_gets_its_rendezvous_on_the_first_learner_node() -> None:
    cfg = config_mod.load(None, [*PREPARED, "learner.learners=2"])
    nodes = ray_launch.nodes_of([ray_node("10.0.0.1", head=True), ray_node("10.0.0.2", learner=1)])
    ray_launch.assign_addresses(cfg, nodes, ports_from(7000))
    assert cfg.cluster.learner_store.startswith("10.0.0.2:")
    plan = ray_launch.node_plan(cfg, "run/config.toml", nodes)
    assert {plan[("learner", i)].ip for i in range(3)} == {"10.0.0.2"}


@pytest.mark.parametrize("role", ["redis", "actor"])
def test_a_role_no_node_offers_may_go_anywhere(role: str) -> None:
    nodes = ray_launch.nodes_of([ray_node("10.0.0.1", head=True), ray_node("10.0.0.2", learner=1)])
    assert ray_launch.eligible(role, nodes) == nodes


def test_learners_share_a_gpu_only_where_there_are_more_of_them_than_gpus() -> None:
    cfg = config_mod.load(None, [*PREPARED, "learner.learners=2"])  # ranks 0, 1 and the standby 2
    one, two = ray_launch.nodes_of([ray_node("10.0.0.1", head=True, gpus=1), ray_node("10.0.0.2", gpus=2)])
    where = {("learner", 0): one, ("learner", 1): two, ("learner", 2): one, ("actor", 0): two}
    assert ray_launch.learner_gpu_share(cfg, where) == {0: 0.5, 1: 1.0, 2: 0.5}
    three = {("learner", i): two for i in range(3)}
    assert ray_launch.learner_gpu_share(cfg, three) == {0: 0.5, 1: 0.5, 2: 0.5}  # packs on 2 GPUs
    cfg.learner.device = "cpu"
    assert ray_launch.learner_gpu_share(cfg, where) == {}


def test_up_refuses_ray_with_resume(capsys: pytest.CaptureFixture[str]) -> None:
    from canopy.cluster import cli

    assert cli.main(["up", "--ray", "10.0.0.1:6379", "--resume", "runs/x"]) == 2
    assert "--ray starts a new run" in capsys.readouterr().err


def test_ray_is_imported_only_by_a_ray_run() -> None:
    code = "import sys, canopy.cluster.cli, canopy.cluster.ray_launch; sys.exit('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_a_ray_run_without_ray_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(UserError, match=r"pip install 'canopy-rl\[ray\]'"):
        ray_launch.up(config_mod.load(None), "10.0.0.1:6379")


def test_each_role_is_sent_its_own_secrets_only(tmp_path: Path) -> None:
    from canopy import acl, curve, tls

    secrets = tmp_path / "secrets"
    secrets.mkdir()
    users = ["redis", *acl.ROLES, *(acl.actor_user(i) for i in range(2))]
    for user in users:
        (secrets / ("redis.password" if user == "redis" else f"redis.{user}.password")).write_text(user)
    curve.generate(secrets / "curve")
    tls.generate(secrets / "tls", ["10.0.0.1"])
    cfg = config_mod.load(
        None,
        [
            *PREPARED,
            "actors.count=2",
            f'cluster.password_file="{secrets / "redis.password"}"',
            f'cluster.curve_dir="{secrets / "curve"}"',
            "cluster.role_users=true",
            "cluster.actor_users=true",
            "cluster.tls=true",
        ],
    )
    config_path = tmp_path / "config.toml"
    config_mod.save(cfg, config_path)

    def sent(role: str, ident: int) -> set[str]:
        files = ray_launch.role_files(cfg, config_path, role, ident)
        assert files[str(config_path)][0] == config_path.read_bytes()
        return {str(Path(p).relative_to(secrets)) for p in files if p != str(config_path)}

    assert sent("actor", 1) == {
        "redis.actor-1.password",
        "tls/ca.crt",
        "curve/actor/actor.key_secret",
        "curve/server/replay.key",
        "curve/server/cache.key",
    }
    replay = sent("replay", 0)
    assert {"redis.replay.password", "tls/ca.crt", "curve/server/replay.key_secret"} <= replay
    assert "curve/authorized/actor/actor.key" in replay and not any(
        "password" in p for p in replay - {"redis.replay.password"}
    )
    shard = sent("redis", 0)
    assert shard == {f"redis.{u}.password" if u != "redis" else "redis.password" for u in users} | {
        "tls/ca.crt",
        "tls/redis.crt",
        "tls/redis.key",
    }
    # Files keep their mode: the shard's TLS key stays unreadable to others on its node.
    files = ray_launch.role_files(cfg, config_path, "redis", 0)
    assert files[str(secrets / "tls" / "redis.key")][1] & 0o077 == 0
