"""learner/checkpoint/placement.py: deterministic R-way placement on distinct hosts."""

from __future__ import annotations

import pytest

from canopy.learner.checkpoint.placement import make_plan

CASES = [
    # shard hosts, R, learner host
    (["a", "b"], 2, "a"),
    (["a", "b", "c", "d"], 2, "a"),
    (["a", "a", "b", "b", "c", "c"], 2, "b"),
    (["a", "b", "c", "d", "e"], 2, "z"),
    (["a", "b", "c", "d", "e", "f"], 3, "a"),
]


@pytest.mark.parametrize(("hosts", "r", "learner_host"), CASES)
def test_every_chunk_is_on_r_shards_of_distinct_hosts_never_only_the_learners(
    hosts: list[str], r: int, learner_host: str
) -> None:
    plan = make_plan(hosts, r, learner_host)
    assert not plan.warning
    for chunk in range(50):
        shards = plan.shards_for(chunk)
        placed = [hosts[s] for s in shards]
        assert len(shards) == r and len(set(placed)) == r
        assert set(placed) != {learner_host}


def test_the_plan_is_deterministic() -> None:
    a = make_plan(["a", "b", "c", "d"], 2, "a", learner=1)
    b = make_plan(["a", "b", "c", "d"], 2, "a", learner=1)
    assert [a.shards_for(i) for i in range(20)] == [b.shards_for(i) for i in range(20)]


def test_group_placement_is_chosen_where_it_loses_data_less_often_than_ring() -> None:
    plan = make_plan(["a", "b", "c", "d", "e", "f"], 2)
    assert plan.strategy == "group"
    # 3 pairs can be wiped out by 2 host failures out of C(6,2)=15, ring has 6.
    assert plan.loss_probability["group"] == pytest.approx(3 / 15)
    assert plan.loss_probability["ring"] == pytest.approx(6 / 15)
    assert sorted(plan.sets) == [("a", "b"), ("c", "d"), ("e", "f")]


def test_a_single_copy_goes_to_another_host_than_the_learners() -> None:
    plan = make_plan(["a", "b", "c"], 1, learner_host="a")
    assert all(plan.shard_hosts[plan.shards_for(c)[0]] != "a" for c in range(10))


def test_too_few_hosts_degrades_with_a_warning_instead_of_failing() -> None:
    plan = make_plan(["a", "a"], 2, learner_host="a")
    assert plan.replicas == 1 and "distinct host" in plan.warning and "learner's own host" in plan.warning
