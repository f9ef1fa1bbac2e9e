"""The topology planner's choices follow its cost model: shallow for small models or few
hosts, narrower and deeper as models grow, bounded root egress, and a tree numbering that
every node computes alike."""

from __future__ import annotations

import math

import pytest

from canopy import config as config_mod
from canopy.cache import topology
from canopy.cache.topology import Inputs, parents_of, plan, tiers_of

MIB = 1 << 20


def test_one_host_hangs_its_leaf_directly_under_redis() -> None:
    p = plan(Inputs(hosts=1, actors_per_host=1000, model_bytes=8 * MIB))
    assert (p.fanout, p.depth, p.tiers) == (1, 1, [1])
    assert p.root_egress_bytes == 8 * MIB  # one copy leaves Redis, whatever the actors


def test_a_model_of_one_chunk_goes_flat_to_a_few_hosts() -> None:
    # Nothing to pipeline: a second tier costs a hop and saves only a little egress.
    p = plan(Inputs(hosts=4, actors_per_host=10, model_bytes=MIB // 2))
    assert p.depth == 1 and p.fanout == 4


@pytest.mark.parametrize("hosts", [4, 16, 100])
def test_a_many_chunk_model_picks_a_narrower_deeper_tree_than_a_one_chunk_model(hosts: int) -> None:
    small = plan(Inputs(hosts=hosts, actors_per_host=10, model_bytes=MIB // 2))
    large = plan(Inputs(hosts=hosts, actors_per_host=10, model_bytes=64 * MIB))
    assert large.fanout < small.fanout and large.depth > small.depth


def test_the_plan_is_the_cheapest_of_every_depth_under_the_cost_model() -> None:
    inputs = Inputs(hosts=100, actors_per_host=10, model_bytes=8 * MIB)
    p = plan(inputs)
    for d in range(1, topology.MAX_DEPTH + 1):
        f = math.ceil(100 ** (1 / d) - 1e-9)
        assert p.tree_s <= topology.cost(inputs, f)[0] + 1e-12
    assert p.fanout**p.depth >= 100 and p.tiers[-1] == 100


def test_a_slow_node_egress_makes_the_tree_narrower() -> None:
    fast = plan(Inputs(hosts=64, actors_per_host=10, model_bytes=4 * MIB, link_bytes_s=1.25e9))
    slow = plan(Inputs(hosts=64, actors_per_host=10, model_bytes=4 * MIB, hop_overhead_s=0, latency_s=0))
    assert slow.fanout <= fast.fanout
    wide = plan(Inputs(hosts=64, actors_per_host=10, model_bytes=MIB, latency_s=0.05))
    assert wide.depth == 1  # long hops, one chunk: a single tier wins


def test_a_forced_fanout_is_kept_and_root_egress_is_that_fanout_times_the_model() -> None:
    p = plan(Inputs(hosts=10, actors_per_host=5, model_bytes=8 * MIB, fanout=3))
    assert p.fanout == 3 and p.tiers == tiers_of(10, 3) == [2, 4, 10]
    assert p.root_egress_bytes == 2 * 8 * MIB <= p.fanout * 8 * MIB
    with pytest.raises(ValueError, match="fanout 1 cannot reach"):
        Inputs(hosts=3, actors_per_host=1, model_bytes=1, fanout=1)


def test_breadth_first_numbering_gives_each_node_its_parent_then_its_ancestors() -> None:
    assert [parents_of(i, 2) for i in range(8)] == [[], [], [0], [0], [1], [1], [2, 0], [2, 0]]
    assert parents_of(0, 1) == [] and parents_of(3, 1) == [2, 1, 0]
    # Every node has at most `fanout` children.
    children: dict[int, int] = {}
    for i in range(200):
        chain = parents_of(i, 3)
        if chain:
            children[chain[0]] = children.get(chain[0], 0) + 1
    assert max(children.values()) == 3


def test_canopy_up_plans_from_its_config_and_a_set_fanout_wins() -> None:
    cfg = config_mod.load(None, ["cache.nodes=4", "actors.count=8"])
    assert topology.for_config(cfg).inputs.hosts == 4
    assert topology.for_config(cfg).depth == 1  # a small MLP is one chunk: all under Redis
    cfg = config_mod.load(None, ["cache.nodes=4", "cache.fanout=2"])
    assert topology.for_config(cfg).fanout == 2


def test_the_plan_describes_itself_for_people_and_as_json() -> None:
    p = plan(Inputs(hosts=8, actors_per_host=100, model_bytes=8 * MIB))
    text = p.describe()
    assert f"fan-out {p.fanout}, depth {p.depth}" in text and "Redis root sends" in text
    assert p.to_dict()["inputs"]["hosts"] == 8
