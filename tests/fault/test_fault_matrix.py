"""The fault matrix in CI: one real `canopy up` CartPole run takes the faults the other
tests in tests/fault/ do not cover (cluster/bench/faults.py injects and measures them).

Tests run in file order on the one shared run; each first waits for the cluster to settle
(every role running, the standby warm, a checkpoint committed since the last fault). The
last test stops the run and checks that no process it ever started is left.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from canopy.cluster.bench.faults import Cluster, Outcome
from canopy.version import Version

pytestmark = [pytest.mark.fault, pytest.mark.slow]

# Recovery limits for a shared 2-core CI machine: the bench's goals (GOALS_S), with slack.
CI_LIMIT_S = {"actor": 20.0, "replay": 20.0, "cache": 30.0, "standby": 10.0, "zombie": 10.0, "cold": 30.0}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    run = Cluster(Path(tmp_path_factory.mktemp("faults")) / "run", time_limit_s=400)
    try:
        yield run
    finally:
        run.close()


def assert_survived(o: Outcome) -> None:
    print(f"{o.fault}: detected in {o.detect_s}s by {o.detected_by}, recovered in {o.recover_s}s")
    assert not o.error, f"{o.fault}: {o.error}"
    assert o.detect_s is not None and o.detect_s < 5.0, o
    assert o.recover_s is not None and o.recover_s <= CI_LIMIT_S[o.fault], o
    assert o.versions_increasing, (o.version_before, o.version_after)
    assert not o.checkpoints_lost and o.checkpoints_checked > 0, o.checkpoints_lost
    assert not o.eval_collapsed, (o.eval_before, o.eval_after)


def test_a_killed_actor_is_restarted_and_training_goes_on(cluster: Cluster) -> None:
    o = cluster.inject("actor")
    assert o.detected_by == "role_died"
    assert_survived(o)


def test_a_killed_replay_shard_comes_back_and_every_actor_keeps_inserting(cluster: Cluster) -> None:
    o = cluster.inject("replay")
    assert o.detected_by == "role_died"
    assert_survived(o)


def test_a_cache_node_killed_mid_fetch_comes_back_and_actors_get_newer_versions(cluster: Cluster) -> None:
    o = cluster.inject("cache")
    assert o.recovered_by == "every actor on a newer version"
    assert_survived(o)


def test_killing_the_standby_after_it_took_over_hands_training_to_the_restarted_learner(
    cluster: Cluster,
) -> None:
    o = cluster.inject("standby")
    assert o.detected_by in ("role_died", "failover")
    assert o.recovered_by.startswith("first version of epoch")
    assert_survived(o)


def test_a_paused_learner_is_fenced_when_it_wakes_and_publishes_nothing(cluster: Cluster) -> None:
    o = cluster.inject("zombie")
    assert o.detected_by == "failover"
    assert o.fenced, "the learner woken after its lease expired did not stop"
    assert o.zombie_writes == [], f"the fenced learner still wrote: {o.zombie_writes}"
    assert_survived(o)


def test_killing_every_learner_brings_a_version_of_a_new_epoch_from_the_newest_checkpoint(
    cluster: Cluster,
) -> None:
    o = cluster.inject("cold")
    assert o.target.count("learner") == 2, o.target  # the active one and its standby
    assert o.recovered_by.endswith("announced on model:notify")
    epoch_before = Version.parse(o.version_before).epoch
    assert Version.parse(o.recovered_by.split()[0]).epoch > epoch_before
    assert {"launcher_restart", "telemetry_up", "lease_taken", "restored", "announced"} <= set(o.phases), (
        o.phases
    )
    assert 0 < o.phases["launcher_restart"] < o.phases["telemetry_up"] < o.phases["announced"], o.phases
    assert_survived(o)


def test_no_process_of_the_run_is_left_behind(cluster: Cluster) -> None:
    cluster.close()
    assert cluster.pids, "no process of the run was ever tracked"
    assert cluster.leftover == [], f"still alive after the run stopped: {cluster.leftover}"
