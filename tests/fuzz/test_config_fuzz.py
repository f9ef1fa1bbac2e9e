"""Randomized `--set` overrides and TOML files: a ConfigError with one-line problems, never
a traceback from deep inside the loader."""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from canopy import config
from canopy.config import Config
from canopy.errors import ConfigError

KEYS = [f"{section}.{key}" for section, table in config.to_dict(Config()).items() for key in table]
VALUES = st.one_of(
    st.text(max_size=20),
    st.integers().map(str),
    st.floats().map(repr),
    st.sampled_from(["true", "[1, 2]", '"x"', "{a = 1}", "inf", "-1", "0", "1e400", "[", '"', "nan"]),
)
OVERRIDES = st.lists(
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS) | st.text(max_size=15), VALUES)
    | st.text(max_size=30),
    max_size=4,
)


@settings(max_examples=400, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(OVERRIDES)
def test_any_override_is_applied_or_refused_with_one_line_problems(overrides: list[str]) -> None:
    try:
        config.load(None, overrides)
    except ConfigError as exc:
        assert exc.problems and all(p and "\n" not in p for p in exc.problems)


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(
    st.text(max_size=200)
    | st.builds(lambda k, v: "[" + k.replace(".", "]\n", 1) + f" = {v}\n", st.sampled_from(KEYS), VALUES)
)
def test_any_toml_file_is_loaded_or_refused_with_one_line_problems(tmp_path_factory, text: str) -> None:
    path: Path = tmp_path_factory.mktemp("cfg") / "c.toml"
    path.write_text(text)
    try:
        config.load(path)
    except ConfigError as exc:
        assert exc.problems and all(p and "\n" not in p for p in exc.problems)
