"""replay/membership.py without Redis: rendezvous hashing and the checks on what Redis returns."""

from __future__ import annotations

import pytest

from canopy.replay.membership import Members, _check, shard_for

ACTORS = range(3000)


def owners(shards: set[int]) -> dict[int, int]:
    return {a: shard_for(a, shards) for a in ACTORS}


def test_an_actor_maps_to_the_same_shard_whatever_the_order_of_the_ids() -> None:
    assert all(shard_for(a, [0, 1, 2, 3]) == shard_for(a, (3, 1, 0, 2)) for a in range(200))


def test_actors_spread_evenly_over_the_shards() -> None:
    counts = [list(owners({0, 1, 2, 3}).values()).count(s) for s in range(4)]
    assert all(abs(c - len(ACTORS) / 4) < 0.1 * len(ACTORS) / 4 for c in counts), counts


def test_a_leaving_shard_moves_only_its_own_actors() -> None:
    before, after = owners({0, 1, 2, 3}), owners({0, 1, 3})
    moved = {a for a in ACTORS if before[a] != after[a]}
    assert moved == {a for a in ACTORS if before[a] == 2}


def test_a_joining_shard_takes_about_a_fair_share_and_only_moves_actors_to_itself() -> None:
    before, after = owners({0, 1, 2}), owners({0, 1, 2, 7})
    moved = {a for a in ACTORS if before[a] != after[a]}
    assert all(after[a] == 7 for a in moved)
    assert abs(len(moved) / len(ACTORS) - 1 / 4) < 0.03, len(moved)


def test_choosing_among_no_shards_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least one shard"):
        shard_for(1, [])


def test_a_fixed_endpoint_list_is_keyed_by_position() -> None:
    assert Members(["tcp://a:1", "tcp://b:2"]).view == (0, {0: "tcp://a:1", 1: "tcp://b:2"})


@pytest.mark.parametrize(
    ("raw_id", "raw_endpoint", "expected"),
    [
        (b"3", b"tcp://10.0.0.1:5555", (3, "tcp://10.0.0.1:5555")),
        (b"0", b"ipc:///tmp/replay-0", (0, "ipc:///tmp/replay-0")),
        (b"x", b"tcp://h:1", (None, "")),  # id not a number
        (b"-1", b"tcp://h:1", (None, "")),
        (b"99999999999", b"tcp://h:1", (None, "")),
        (b"1", b"", (None, "")),  # endpoint missing from the hash
        (b"1", b"http://h:1", (None, "")),  # not a ZeroMQ transport
        (b"1", b"tcp://h:1 ; rm", (None, "")),  # spaces
        (b"1", b"tcp://\xff\xfe", (None, "")),  # not ASCII
        (b"1", b"tcp://" + b"h" * 300, (None, "")),  # too long
    ],
)
def test_member_entries_from_redis_are_checked(raw_id: bytes, raw_endpoint: bytes, expected: tuple) -> None:
    assert _check(raw_id, raw_endpoint) == expected
