"""`canopy up` with `learner.learners = 2`: a data-parallel learner group of real processes.

Two learner processes (rank 0 = learner 0, holding the lease; rank 1 = learner 1, a
follower) train CartPole together on CPU over gloo. The test checks that both ranks
update, that only rank 0 publishes versions, that a checkpoint (which gathers every
rank's sampler state) commits, and that after the group stops the two ranks stopped at
the same update count with the same parameter digest.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import redis
from conftest import wait_for
from test_up import canopy_up  # noqa: F401 (the fixture)

from canopy import config as config_mod
from canopy.actors.policy import population_arrays
from canopy.cluster.export import read_policy
from canopy.keys import Keys
from canopy.redisconn import connect

SETTINGS = [
    "learner.learners=2",
    "checkpoint.standby=false",  # keep the 2-core box for the group itself
    "checkpoint.every_s=2.0",
    "actors.count=1",
    "replay.min_size=300",
    "learner.publish_every=20",
    "learner.batch_size=64",
    "run.heartbeat_s=0.5",
]


def _hash(r: redis.Redis, key: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in r.hgetall(key).items()}


def _events(r: redis.Redis, keys: Keys, kind: str, since: str = "-") -> list[dict[str, str]]:
    """Events of `kind`, those after stream id `since` when given."""
    out = []
    for _, fields in r.xrange(keys.events, min=since if since == "-" else f"({since}"):
        event = {k.decode(): v.decode() for k, v in fields.items()}
        if event.get("kind") == kind:
            out.append(event)
    return out


def test_two_learner_ranks_train_in_step_and_only_rank_0_publishes(canopy_up) -> None:  # noqa: F811
    args = "--env CartPole-v1 --stop-at-return 100000 --time-limit 300 "
    run = canopy_up(args + " ".join(f"--set {s}" for s in SETTINGS))
    cluster_json = run.run_dir / "cluster.json"
    wait_for(
        lambda: cluster_json.exists() or run.proc.poll() is not None,
        120,
        interval=0.2,
        what="cluster.json (every role, both learner ranks included, running)",
    )
    assert run.proc.poll() is None, f"canopy up exited: {run.stderr_text()[-2000:]}"
    cfg = config_mod.load(Path(run.run_dir) / "config.toml")
    assert cfg.cluster.learner_store, "canopy up fills in the group's rendezvous address"
    keys = Keys(cfg.run.name)
    r = connect(cfg.cluster, "status", 0)
    learners = {e["id"]: e["pid"] for e in run.cluster()["roles"]["learner"]}
    assert sorted(learners) == [0, 1], "two ranks, no standby"

    def trained() -> bool:
        follower = _hash(r, keys.proc("learner", 1))
        leader = _hash(r, keys.proc("learner", 0))
        return (
            int(follower.get("updates_total", 0)) >= 100
            and int(leader.get("versions_published_total", 0)) >= 3
            and int(leader.get("checkpoints_total", 0)) >= 1
        )

    wait_for(trained, 90, interval=0.25, what="both ranks training, 3 versions, a checkpoint")
    leader, follower = _hash(r, keys.proc("learner", 0)), _hash(r, keys.proc("learner", 1))
    assert follower["rank"] == "1" and leader["rank"] == "0"
    assert follower["epoch"] == leader["epoch"], "one group, one epoch"
    assert follower["versions_published_total"] == "0"
    group = _hash(r, keys.learner_group)
    assert group["world"] == "2" and group["epoch"] == leader["epoch"]

    ledger = [_hash(r, k) for k in r.scan_iter(match=f"{keys.prefix}ledger:version:*")]
    assert len(ledger) >= 3
    assert {entry["learner"] for entry in ledger} == {"0"}, "a version published by rank 1"
    commits = _events(r, keys, "checkpoint_commit")
    assert commits and all(e["id"] == "0" for e in commits), "only rank 0 commits checkpoints"

    # Stop the group: one rank's stop reaches the other through the control all-reduce,
    # so both stop after the same update, holding the same parameters.
    for pid in learners.values():
        os.kill(pid, signal.SIGTERM)

    def stops() -> dict[str, dict[str, str]]:
        found = {e["id"]: e for e in _events(r, keys, "stop") if e["role"] == "learner"}
        return found if {"0", "1"} <= set(found) else {}

    stopped = wait_for(stops, 30, interval=0.2, what="both learner ranks to report their stop")
    assert int(stopped["0"]["updates"]) >= 100
    assert stopped["0"]["updates"] == stopped["1"]["updates"], stopped
    assert stopped["0"]["digest"] == stopped["1"]["digest"], "the ranks' parameters diverged"
    assert not _events(r, keys, "group_lost"), "a clean stop is not a lost group"


def test_a_population_trains_in_a_group_and_the_group_reforms_after_a_rank_is_killed(
    canopy_up,  # noqa: F811
) -> None:
    """`learner.models = 2` on 2 ranks: one version holds both models, actor i acts with model
    i % 2, the evaluator judges both; SIGKILL of the follower ends the group, and `canopy up`
    brings both ranks back as a new group under a newer epoch, from the newest checkpoint."""
    settings = [*SETTINGS, "learner.models=2", "learner.model_lr=[1e-3,3e-4]", "actors.count=2"]
    run = canopy_up(
        "--env CartPole-v1 --stop-at-return 100000 --time-limit 300 "
        + " ".join(f"--set {s}" for s in settings)
    )
    cluster_json = run.run_dir / "cluster.json"
    wait_for(
        lambda: cluster_json.exists() or run.proc.poll() is not None, 120, interval=0.2, what="cluster.json"
    )
    assert run.proc.poll() is None, f"canopy up exited: {run.stderr_text()[-2000:]}"
    cfg = config_mod.load(Path(run.run_dir) / "config.toml")
    keys = Keys(cfg.run.name)
    r = connect(cfg.cluster, "status", 0)
    procs = lambda role, ident: _hash(r, keys.proc(role, ident))  # noqa: E731

    def trained() -> bool:
        leader, ev = procs("learner", 0), procs("evaluator", 0)
        return (
            int(procs("learner", 1).get("updates_total", 0)) >= 100
            and int(leader.get("checkpoints_total", 0)) >= 1
            and len(leader.get("model_losses", "").split()) == 2
            and len(ev.get("eval_model_returns", "").split()) == 2
            and {procs("actor", i).get("policy_model") for i in (0, 1)} == {"0", "1"}
        )

    wait_for(trained, 120, interval=0.25, what="both ranks training 2 models, a checkpoint, both judged")
    _, arrays = read_policy(r, keys)
    models = population_arrays(arrays)
    assert len(models) == 2 and models[0].keys() == models[1].keys()
    assert not all(np.array_equal(models[0][k], models[1][k]) for k in models[0]), "the two models are one"
    epoch = int(procs("learner", 0)["epoch"])

    # Kill the follower: the group is lost, rank 0 stops, both come back as a new group.
    os.kill(int(procs("learner", 1)["pid"]), signal.SIGKILL)

    def reformed() -> bool:
        group = _hash(r, keys.learner_group)
        leader, follower = procs("learner", 0), procs("learner", 1)
        return (
            int(group.get("epoch", 0)) > epoch
            and leader.get("epoch") == follower.get("epoch") == group["epoch"]
            and leader.get("state") == follower.get("state") == "running"
            and int(leader.get("checkpoints_total", 0)) >= 1
        )

    wait_for(reformed, 120, interval=0.25, what="a new group (newer epoch) training again after the kill")
    assert any(e["id"] == "0" for e in _events(r, keys, "group_lost")), "rank 0 did not see its group end"
    restores = [e for e in _events(r, keys, "restore") if int(e["epoch"]) > epoch]
    assert restores, "the new group did not start from a checkpoint"

    mark = r.xrevrange(keys.events, count=1)[0][0].decode()
    for ident in (0, 1):
        os.kill(int(procs("learner", ident)["pid"]), signal.SIGTERM)

    def stops() -> dict[str, dict[str, str]]:
        found = {e["id"]: e for e in _events(r, keys, "stop", since=mark) if e["role"] == "learner"}
        return found if {"0", "1"} <= set(found) else {}

    stopped = wait_for(stops, 30, interval=0.2, what="both ranks of the new group to report their stop")
    assert int(stopped["0"]["updates"]) > int(restores[-1]["ckpt"].split(".")[1])
    assert stopped["0"]["updates"] == stopped["1"]["updates"], stopped
    assert stopped["0"]["digest"] == stopped["1"]["digest"], "the new group's ranks diverged"
