"""canopy/keys.py: every Redis key of a run lives under `canopy:<run>:`."""

from __future__ import annotations

import inspect
import typing

import pytest

from canopy.keys import Keys
from canopy.version import Version

SAMPLE_ARGS = {Version: Version(3, 150), int: 2, str: "sample"}


def all_keys(keys: Keys) -> dict[str, str]:
    """Every key name the class can produce: each property read, each method called with a
    sample argument of each parameter's annotated type (so new key kinds are covered too)."""
    names = {}
    for name, member in inspect.getmembers(Keys):
        if name.startswith("_"):
            continue
        if isinstance(member, property):
            names[name] = getattr(keys, name)
        elif inspect.isfunction(member):
            hints = typing.get_type_hints(member)
            params = list(inspect.signature(member).parameters)[1:]
            args = [SAMPLE_ARGS[next(t for t in SAMPLE_ARGS if t in _types(hints[p]))] for p in params]
            names[name] = getattr(keys, name)(*args)
    return names


def _types(hint: object) -> tuple:
    return typing.get_args(hint) or (hint,)


RUNS = [
    pytest.param("demo", id="simple"),
    pytest.param("20250101-120000-ab12", id="launcher-style"),
]


@pytest.mark.parametrize("run", RUNS)
def test_every_key_starts_with_the_run_prefix(run: str) -> None:
    keys = Keys(run)
    names = all_keys(keys)
    assert len(names) >= 10  # proc, alive, events, epoch, model_*, ledger_*
    for method, key in names.items():
        assert key.startswith(f"canopy:{run}:"), f"{method} -> {key}"
        assert keys.prefix == f"canopy:{run}:"


def test_keys_of_different_runs_never_collide() -> None:
    a, b = all_keys(Keys("a")), all_keys(Keys("b"))
    assert not set(a.values()) & set(b.values())


def test_keys_of_one_run_are_distinct_and_name_their_arguments() -> None:
    keys = Keys("demo")
    names = all_keys(keys)
    assert len(set(names.values())) == len(names)
    assert keys.proc("learner", 0) == "canopy:demo:proc:learner:0"
    assert keys.model_chunk(Version(3, 150), 2) == "canopy:demo:model:3.150:chunk:2"
    assert keys.model_manifest(Version(3, 150)) == "canopy:demo:model:3.150:manifest"
    assert keys.model_chunk(Version(3, 150), 2) != keys.model_chunk(Version(3, 150), 3)
