"""Reading raw config data into the typed tree: `--set` overrides merged into the TOML data,
then each section dataclass built from it with every value checked against its type hint.

Place: below canopy/config.py, which owns the tree (its sections, defaults and the limits
`verify` checks) and calls these from `load`. Nothing here knows a section by name, so a new
field needs no change here. Problems are collected, one line each, never raised one by one:
`load` reports them all at once.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from typing import Any


def apply_overrides(data: dict[str, Any], overrides: list[str], problems: list[str]) -> None:
    """Merge `section.key=value` items into `data`, each value read as a TOML literal."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"override {item!r} must look like section.key=value")
            continue
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                problems.append(f"override {key}: {part} is not a section")
                break
        else:
            node[parts[-1]] = parse_value(raw.strip())


def parse_value(raw: str) -> Any:
    """Read an override as a TOML value (`3`, `1e-3`, `[64, 64]`, `true`), else as a string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def build(cls: type, data: Any, prefix: str, problems: list[str]) -> Any:
    """An instance of dataclass `cls` from `data`: unknown keys and ill-typed values are left
    at their defaults and named in `problems` (with `prefix`, the dotted path so far)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    if not isinstance(data, dict):
        problems.append(f"{prefix.rstrip('.') or 'config'} must be a table")
        return cls()
    for key in data:
        if key not in names:
            problems.append(
                f"unknown config key '{prefix}{key}': known keys here are {', '.join(sorted(names))}"
            )
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        hint, value, key = hints[f.name], data[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hint):
            kwargs[f.name] = build(hint, value, key + ".", problems)
        else:
            checked = check_type(hint, value)
            if checked is None:
                problems.append(f"{key} = {value!r} has the wrong type: expected {type_name(hint)}")
            else:
                kwargs[f.name] = checked
    return cls(**kwargs)


def check_type(hint: Any, value: Any) -> Any:
    """Return the value coerced to `hint` (int -> float allowed), or None when it does not fit."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin is dict:  # a TOML table with string keys
        key_hint, item = typing.get_args(hint)
        if not isinstance(value, dict):
            return None
        items = {check_type(key_hint, k): check_type(item, v) for k, v in value.items()}
        return None if any(k is None or v is None for k, v in items.items()) else items
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            return None
        items = [check_type(item, v) for v in value]
        return None if any(i is None for i in items) else items
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            checked = check_type(option, value)
            if checked is not None:
                return checked
        return None
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint in (str, bool) and type(value) is hint:
        return value
    return None


def type_name(hint: Any) -> str:
    """`hint` in the words of a problem line."""
    if typing.get_origin(hint) is list:
        return f"a list of {type_name(typing.get_args(hint)[0])}"
    if typing.get_origin(hint) is dict:
        return "a table with string keys, e.g. {g = 9.81}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(hint, str(hint))
