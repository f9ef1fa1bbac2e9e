"""canopy/version.py: `(epoch, step)` ids as strings, packed int64s, and their order."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from canopy.errors import ProtocolError
from canopy.version import NO_VERSION, Version

epochs = st.integers(min_value=0, max_value=2**31 - 1)
steps = st.integers(min_value=0, max_value=2**32 - 1)


@given(epochs, steps)
def test_string_form_parses_back_to_the_same_version(epoch: int, step: int) -> None:
    v = Version(epoch, step)
    assert str(v) == f"{epoch}.{step}"
    assert Version.parse(str(v)) == v
    assert Version.parse(str(v).encode()) == v


@given(epochs, steps)
def test_packed_int64_unpacks_to_the_same_version_and_fits_in_int64(epoch: int, step: int) -> None:
    v = Version(epoch, step)
    assert 0 <= v.packed() < 2**63
    assert Version.unpack(v.packed()) == v


@given(epochs, steps, epochs, steps)
def test_packed_order_matches_version_order(e1: int, s1: int, e2: int, s2: int) -> None:
    a, b = Version(e1, s1), Version(e2, s2)
    assert (a < b) == (a.packed() < b.packed())


def test_a_newer_epoch_outranks_any_step_of_an_older_one() -> None:
    assert Version(2, 0) > Version(1, 10**6)
    assert Version(1, 51) > Version(1, 50)
    assert max([Version(1, 9), Version(3, 1), Version(2, 99)]) == Version(3, 1)
    assert Version(0, 1) > NO_VERSION


BAD_IDS = [
    pytest.param("", id="empty"),
    pytest.param("12", id="no-dot"),
    pytest.param("1.", id="no-step"),
    pytest.param(".1", id="no-epoch"),
    pytest.param("1.2.3", id="two-dots"),
    pytest.param("-1.2", id="negative"),
    pytest.param("a.b", id="letters"),
    pytest.param(" 1.2", id="leading-space"),
    pytest.param("1" * 20 + "." + "2" * 20, id="too-long"),
    pytest.param(b"\xff\xfe.1", id="undecodable-bytes"),
    # str.isdigit() accepts these, int() does not: they must still be a ProtocolError,
    # since cache nodes and model clients only catch ProtocolError from peers' version ids.
    pytest.param("1.\u00b2", id="superscript-two"),
    pytest.param("\u2460.1", id="circled-one"),
]


@pytest.mark.parametrize("text", BAD_IDS)
def test_parse_rejects_anything_but_epoch_dot_step_with_protocol_error(text: str | bytes) -> None:
    with pytest.raises(ProtocolError):
        Version.parse(text)
