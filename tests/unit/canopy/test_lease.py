"""canopy/lease.py: the lease token `<epoch>:<owner>` and the fencing Lua prefix."""

from __future__ import annotations

import pytest

from canopy.lease import FENCE, fenced_script, parse_token, token


@pytest.mark.parametrize(("epoch", "owner"), [(1, 0), (7, 3), (123456789, 12)])
def test_a_token_parses_back_to_its_epoch_and_owner(epoch: int, owner: int) -> None:
    assert parse_token(token(epoch, owner)) == (epoch, owner)
    assert parse_token(token(epoch, owner).encode()) == (epoch, owner)


def test_the_token_is_epoch_colon_owner() -> None:
    assert token(7, 0) == "7:0"


@pytest.mark.parametrize("value", [None, b"", ""])
def test_no_value_means_no_lease(value: bytes | str | None) -> None:
    assert parse_token(value) is None


@pytest.mark.parametrize("value", ["7", "7:", ":0", "x:0", "7:x", b"7:0:1"])
def test_a_malformed_token_raises_a_value_error_naming_it(value: bytes | str) -> None:
    with pytest.raises(ValueError, match="malformed learner lease token"):
        parse_token(value)


def test_a_fenced_script_checks_the_lease_token_before_its_body() -> None:
    body = "\nredis.call('SET', KEYS[2], ARGV[2])\nreturn 1\n"
    script = fenced_script(body)
    assert script == "\nif redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end" + body
    assert script.startswith(FENCE + "\n")
    assert fenced_script(body.lstrip("\n")) == script
