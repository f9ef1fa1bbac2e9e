"""Building gymnasium environments the way every role needs them, with one-line errors.

Atari (`ALE/<Game>-v5` ids, needs `pip install 'canopy-rl[atari]'`): the preprocessing of
Mnih et al. (2015) as revised by Machado et al. (2018), from gymnasium's own wrappers:
the emulator runs every frame (frameskip=1) with sticky actions; AtariPreprocessing skips
`frame_skip` frames per action, max-pools the last two (sprites flicker), converts to
grey 84x84 and starts episodes with up to `noop_max` no-ops; FrameStackObservation stacks
`frame_stack` frames into uint8 [stack, 84, 84], padded at an episode's start with
copies of its first frame (gymnasium's "reset" padding), so no frame of the previous
episode ever appears in a stack.
Episodes end at game over (not at a lost life) and rewards stay unclipped here: actors clip
the rewards they store in replay to sign(r) (`env.clip_rewards`, `clips_rewards`), after
RecordEpisodeStatistics has counted them, so returns reported by actors and the evaluator
are true game scores.

Environments a user brings: `env.id` may name a module to import first, gymnasium-style
(`my_pkg.envs:MyEnv-v0`: importing `my_pkg.envs` must register `MyEnv-v0`), and
`env.kwargs` go to the env's constructor (`gym.make(id, **kwargs)`) wherever canopy builds
it: actors and the evaluator (`make_vec`), the learner (`env_spec`), `canopy check-env`
and `canopy eval` (`make_one`).

canopy's own tasks (canopy/tasks.py, ids `canopy/...`) are registered by `check_env_id`, which
every path that builds an env goes through.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode

from canopy import tasks
from canopy.config import EnvConfig
from canopy.errors import UserError


def check_env_id(env_id: str) -> None:
    """Fail early, in one line, on an id gymnasium does not know or a module that does not import.

    `module:Name-v0` imports `module` first (as `gym.make` does); `gym.spec` then looks
    `Name-v0` up, so every later `gym.make(env_id)` finds it registered.
    """
    tasks.register()  # canopy's own ids (canopy/CartPoleNoVelocity-v1) resolve in every process
    module, name = split_env_id(env_id)
    if module is not None:
        _import_env_module(module, env_id)
    if is_atari(name):
        _register_atari(name)
    try:
        gym.spec(name)
    except gym.error.Error as exc:
        if module is not None:
            raise UserError(
                f"unknown env id {name!r} ({exc}): importing {module!r} did not register it; "
                f"the module must call gymnasium.register(id={name!r}, entry_point=...) when imported"
            ) from None
        raise UserError(
            f"unknown env id {env_id!r} ({exc}): use a registered gymnasium id such as "
            "CartPole-v1, install the package that registers it, or name the module that "
            "registers it: my_pkg.envs:MyEnv-v0"
        ) from None


def split_env_id(env_id: str) -> tuple[str | None, str]:
    """(module to import or None, registered id) of `module:Name-v0` or `Name-v0`."""
    module, sep, name = env_id.partition(":")
    if not sep:
        return None, env_id
    if not module or not name or ":" in name:
        raise UserError(f"env id {env_id!r}: use Name-v0 or module.path:Name-v0 (one colon)")
    return module, name


def _import_env_module(module: str, env_id: str) -> None:
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise UserError(
            f"env id {env_id!r}: cannot import module {module!r} ({_one_line(exc)}): pip install the "
            "package that provides it, or put its directory on PYTHONPATH (e.g. PYTHONPATH=. canopy "
            "...), wherever canopy roles run"
        ) from None
    except Exception as exc:  # the user's module failed while importing: say how, in one line
        raise UserError(
            f"env id {env_id!r}: importing module {module!r} failed: {type(exc).__name__}: {_one_line(exc)}"
        ) from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def is_atari(env_id: str) -> bool:
    """Whether the id names an Atari game (`ALE/...`, after any `module:` prefix)."""
    return split_env_id(env_id)[1].startswith("ALE/")


def clips_rewards(env_cfg: EnvConfig) -> bool:
    """Whether actors store sign(r) instead of r (`env.clip_rewards`, Atari ids only)."""
    return env_cfg.clip_rewards and is_atari(env_cfg.id)


def _register_atari(env_id: str) -> None:
    try:
        import ale_py
    except ImportError:
        raise UserError(
            f"{env_id} needs the Atari emulator: pip install 'canopy-rl[atari]' (ale-py, opencv)"
        ) from None
    gym.register_envs(ale_py)


def make_vec(
    env_id: str, num_envs: int, env_cfg: EnvConfig | None = None, asynchronous: bool = False
) -> gym.vector.VectorEnv:
    """A vector env in NEXT_STEP autoreset mode, with episode statistics.

    The mode is set explicitly because actors/adder.py depends on it. `asynchronous` steps
    each copy in its own subprocess: worth its IPC only when one env step costs more than
    the pickling of its observation (Atari, physics), not for CartPole.
    """
    e = env_cfg or EnvConfig(id=env_id)
    check_env_id(env_id)
    kwargs, wrappers = _make_args(env_id, e)
    if _steps_in_numpy(env_id, e, asynchronous):
        # One numpy step for every copy (CartPole): 10x a loop over single envs, which
        # makes the evaluator's 100-episode confirmations cost milliseconds, not seconds.
        env = gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="vector_entry_point")
    else:
        env = _build(
            env_id,
            e,
            lambda: gym.make_vec(
                env_id,
                num_envs=num_envs,
                vectorization_mode="async" if asynchronous else "sync",
                vector_kwargs={"autoreset_mode": AutoresetMode.NEXT_STEP},
                wrappers=wrappers,
                **kwargs,
            ),
        )
    space = env.single_action_space
    box = isinstance(space, gym.spaces.Box) and len(space.shape) == 1 and np.isfinite(space.low).all()
    if not (isinstance(space, gym.spaces.Discrete) or box):
        env.close()
        raise UserError(
            f"env {env_id!r} has action space {space}: canopy acts in Discrete spaces (dqn) "
            "and bounded 1-D Box spaces (td3)"
        )
    return gym.wrappers.vector.RecordEpisodeStatistics(env)


def _steps_in_numpy(env_id: str, e: EnvConfig, asynchronous: bool) -> bool:
    """Whether gymnasium has a numpy vector env of `env_id` that behaves as `make_vec`'s copies:
    same dynamics, NEXT_STEP autoreset, and no kwargs or wrappers it could not take."""
    name = split_env_id(env_id)[1]
    entry = gym.spec(name).vector_entry_point
    if asynchronous or e.kwargs or is_atari(env_id) or not isinstance(entry, str):
        return False
    # Others need jax; canopy's own (canopy/tasks.py) are numpy CartPoles.
    return entry.startswith(("gymnasium.envs.classic_control.", "canopy.tasks:"))


def make_one(env_id: str, env_cfg: EnvConfig | None = None, render_mode: str | None = None) -> gym.Env:
    """One env exactly as a copy of `make_vec`'s sees it (Atari preprocessing, `env.kwargs`),
    without episode statistics: for `canopy eval` and `canopy check-env`."""
    e = env_cfg or EnvConfig(id=env_id)
    check_env_id(env_id)
    kwargs, wrappers = _make_args(env_id, e)
    if render_mode is not None:
        kwargs["render_mode"] = render_mode
    env = _build(env_id, e, lambda: gym.make(env_id, **kwargs))
    for wrap in wrappers:
        env = wrap(env)
    return env


def _make_args(env_id: str, e: EnvConfig) -> tuple[dict[str, Any], list[Callable[[gym.Env], gym.Env]]]:
    """Constructor kwargs (the user's `env.kwargs`, plus canopy's for Atari) and wrappers."""
    kwargs: dict[str, Any] = dict(e.kwargs)
    wrappers: list[Callable[[gym.Env], gym.Env]] = []
    if is_atari(env_id):
        kwargs.update(frameskip=1, repeat_action_probability=e.sticky_actions)
        wrappers = [
            lambda env: gym.wrappers.AtariPreprocessing(
                env, noop_max=e.noop_max, frame_skip=e.frame_skip, screen_size=84, grayscale_obs=True
            ),
            lambda env: gym.wrappers.FrameStackObservation(env, e.frame_stack),
        ]
    return kwargs, wrappers


def _build(env_id: str, e: EnvConfig, make: Callable[[], Any]) -> Any:
    """`make()`, with a constructor that refuses `env.kwargs` reported in one line."""
    try:
        return make()
    except TypeError as exc:  # e.g. "__init__() got an unexpected keyword argument 'x'"
        if not e.kwargs:
            raise
        raise UserError(
            f"env.kwargs = {e.kwargs} do not fit {env_id!r}: {_one_line(exc)}: use keyword "
            "arguments of the env's constructor"
        ) from None


@dataclass(frozen=True)
class EnvSpec:
    """What the learner needs to know of an env as actors build it."""

    obs_shape: tuple[int, ...]
    obs_dtype: str  # numpy dtype name
    actions: int  # Discrete: number of actions; Box: action dimensions
    discrete: bool


def env_spec(env_id: str, env_cfg: EnvConfig | None = None) -> EnvSpec:
    """Spaces of the env as actors build it, read from a one-env vector env."""
    env = make_vec(env_id, 1, env_cfg)
    try:
        obs, act = env.single_observation_space, env.single_action_space
        discrete = isinstance(act, gym.spaces.Discrete)
        return EnvSpec(tuple(obs.shape), str(obs.dtype), int(act.n) if discrete else act.shape[0], discrete)
    finally:
        env.close()


def random_stepping_rate(
    env_id: str, num_envs: int, seconds: float, env_cfg: EnvConfig | None = None
) -> float:
    """Env steps/s of a vector env stepped with random actions: an actor's ceiling."""
    env = make_vec(env_id, num_envs, env_cfg)
    try:
        env.reset(seed=0)
        env.action_space.seed(0)
        steps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            env.step(env.action_space.sample())
            steps += num_envs
        return steps / (time.perf_counter() - start)
    finally:
        env.close()


def seed_base(run_seed: int, ident: int, num_envs: int) -> int:
    """First env seed of actor `ident`: distinct, non-overlapping ranges for 2**20 env copies."""
    return (run_seed * 2**20 + ident * num_envs) % 2**31
