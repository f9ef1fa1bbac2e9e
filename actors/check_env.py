"""`canopy check-env ID`: can canopy's actors run this gymnasium environment, and how fast?

Run before a long training job: gymnasium's own API checker, the spaces and what canopy
does with them, seeding determinism (actors derive every env seed from the run seed), and
random-action stepping speed of a vector env, the ceiling for one actor process.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np
from gymnasium.utils.env_checker import check_env
from rich.console import Console
from rich.table import Table

from canopy.config import EnvConfig
from canopy.envs import check_env_id, make_one, random_stepping_rate

SPEED_ENVS = 8
SPEED_SECONDS = 2.0
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # gymnasium colours its warnings for terminals


@dataclass
class Report:
    """The rows of the check-env table, and whether every check passed."""

    env_id: str
    rows: list[tuple[str, str, str]] = field(default_factory=list)  # (check, result, verdict)
    usable: bool = True

    def add(self, check: str, result: str, ok: bool | None = True) -> None:
        """One row; `ok` None is a note, False marks the env unusable."""
        self.rows.append((check, result, {True: "ok", False: "FAIL", None: "note"}[ok]))
        if ok is False:
            self.usable = False


def _short(space: gym.Space) -> str:
    if isinstance(space, gym.spaces.Box):
        return f"Box{space.shape} {space.dtype}"
    return str(space)


def _fits(action_space: gym.Space) -> tuple[str, bool]:
    if isinstance(action_space, gym.spaces.Discrete):
        return f"Discrete({action_space.n}): learner.algorithm = dqn", True
    box = isinstance(action_space, gym.spaces.Box) and len(action_space.shape) == 1
    if box and np.isfinite(action_space.low).all() and np.isfinite(action_space.high).all():
        return f"{_short(action_space)}: learner.algorithm = td3", True
    return f"{_short(action_space)}: canopy needs Discrete or bounded 1-D Box actions", False


def _observation(space: gym.Space) -> tuple[str, bool | None]:
    if isinstance(space, gym.spaces.Box) and space.dtype == np.uint8 and len(space.shape) >= 2:
        if len(space.shape) == 3 and space.shape[1:] == (84, 84):
            return f"stacked frames {space.shape} uint8: the Nature CNN (dqn)", True
        return f"image {space.shape} uint8: flattened into the MLP (no pixel preprocessing yet)", None
    try:
        return f"{_short(space)} -> {gym.spaces.flatdim(space)} floats", True
    except (NotImplementedError, ValueError):
        return f"{space}: cannot be flattened", False


def _deterministic(env_id: str, env_cfg: EnvConfig) -> bool:
    def first(seed: int) -> np.ndarray:
        env = make_one(env_id, env_cfg)
        try:
            obs, _ = env.reset(seed=seed)
            env.action_space.seed(seed)
            obs, *_ = env.step(env.action_space.sample())
            return np.asarray(gym.spaces.flatten(env.observation_space, obs))
        finally:
            env.close()

    return bool(np.array_equal(first(123), first(123)))


def check(env_id: str, env_cfg: EnvConfig | None = None) -> Report:
    """Check `env_id` as canopy's roles build it: with `env_cfg.kwargs` (and, for Atari,
    its preprocessing settings) when given."""
    env_cfg = env_cfg or EnvConfig(id=env_id)
    check_env_id(env_id)
    report = Report(env_id)
    env = make_one(env_id, env_cfg)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                check_env(env.unwrapped, skip_render_check=True)
                report.add("gymnasium API check", f"passed, {len(caught)} warnings", True)
            except Exception as exc:  # the checker raises assorted types on a broken env
                report.add("gymnasium API check", f"{type(exc).__name__}: {exc}"[:200], False)
        for w in caught[:3]:
            text = ANSI.sub("", str(w.message)).removeprefix("WARN: ")
            report.add("  warning", text[:200], None)
        report.add("action space", *_fits(env.action_space))
        report.add("observation space", *_observation(env.observation_space))
        spec = env.spec
        limit = spec.max_episode_steps if spec else None
        report.add(
            "episode limit",
            f"{limit} steps (truncation: canopy bootstraps)" if limit else "none: episodes may never end",
            True if limit else None,
        )
    finally:
        env.close()
    if report.usable:
        same = _deterministic(env_id, env_cfg)
        report.add("reset(seed) determinism", "same seed, same start" if same else "differs", same or None)
        rate = random_stepping_rate(env_id, SPEED_ENVS, SPEED_SECONDS, env_cfg)
        report.add(
            f"random stepping, {SPEED_ENVS} envs", f"{rate:,.0f} env steps/s (one actor's ceiling)", True
        )
    return report


def main(env_id: str, env_cfg: EnvConfig | None = None) -> int:
    """Print the report as a table; the exit status is 0 when the env is usable."""
    report = check(env_id, env_cfg)
    table = Table(title=f"canopy check-env {env_id}")
    for name in ("check", "result", "verdict"):
        table.add_column(name)
    for row in report.rows:
        table.add_row(*row)
    console = Console()
    console.print(table)
    verdict = "usable with canopy" if report.usable else "not usable with canopy as it is"
    console.print(f"{env_id}: {verdict}")
    return 0 if report.usable else 1
