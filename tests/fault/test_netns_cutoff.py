"""A host cut off the network, on the deploy cluster in network namespaces (the bench's
`cut-actors` and `cut-learner` faults, cluster/bench/cutoff.py).

Cut the actors' host: they are reported dead once their liveness deadlines pass, and come
back on their own when the link returns, acting with newer versions. Cut the active
learner's host: its warm standby on another host takes over, and the cut-off learner stops
(fenced) when the link returns, publishing and committing nothing. Skipped with the reason
where network namespaces cannot be built.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from canopy.cluster import netns
from canopy.cluster.bench.cutoff import HOSTS, NetnsCluster
from canopy.cluster.bench.faults import Outcome

pytestmark = [pytest.mark.fault, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetnsCluster]:
    reason = netns.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with netns.Network(HOSTS) as net:
        c = NetnsCluster(net, Path(tmp_path_factory.mktemp("cutoff")))
        try:
            c.start()
            c.wait_training()
            yield c
        finally:
            c.close()
        assert c.leftover == [], f"roles that would not stop: {c.leftover}"


def assert_survived(o: Outcome) -> None:
    print(f"{o.fault}: {o.target}; detected in {o.detect_s}s by {o.detected_by}, recovered in {o.recover_s}s")
    assert not o.error, f"{o.fault}: {o.error}"
    assert o.detect_s is not None and o.recover_s is not None and o.recover_s <= 2 * o.goal_s, o
    assert o.versions_increasing, (o.version_before, o.version_after)
    assert o.checkpoints_checked > 0 and not o.checkpoints_lost, o.checkpoints_lost


def test_cut_off_actors_are_seen_dead_and_come_back_on_their_own(cluster: NetnsCluster) -> None:
    o = cluster.inject("cut-actors")
    assert o.detected_by == "liveness deadline passed"
    assert_survived(o)


def test_a_cut_off_learner_is_replaced_by_its_standby_and_fenced_when_it_returns(
    cluster: NetnsCluster,
) -> None:
    o = cluster.inject("cut-learner")
    assert o.detected_by == "failover"
    assert o.fenced, "the cut-off learner kept running after its link came back"
    assert o.zombie_writes == [], f"the cut-off learner still wrote: {o.zombie_writes}"
    assert_survived(o)
