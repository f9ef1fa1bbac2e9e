"""Building gymnasium environments the way every role needs them, with one-line errors.

Atari (`ALE/<Game>-v5` ids, needs `pip install 'canopy-rl[atari]'`): the preprocessing of
Mnih et al. (2015) as revised by Machado et al. (2018), from gymnasium's own wrappers:
the emulator runs every frame (frameskip=1) with sticky actions; AtariPreprocessing skips
`frame_skip` frames per action, max-pools the last two (sprites flicker), converts to
grey 84x84 and starts episodes with up to `noop_max` no-ops; FrameStackObservation stacks
`frame_stack` frames into uint8 [stack, 84, 84], padded at an episode's start with
copies of its first frame (gymnasium's "reset" padding), so no frame of the previous
episode ever appears in a stack.
Episodes end at game over (not at a lost life) and rewards stay unclipped here: clipping
is the learner's business, so returns reported by actors are true game scores.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode

from cluster.config import EnvConfig
from cluster.errors import UserError


def check_env_id(env_id: str) -> None:
    """Fail early, in one line, on an id gymnasium does not know."""
    if is_atari(env_id):
        _register_atari(env_id)
    try:
        gym.spec(env_id)
    except gym.error.Error as exc:
        raise UserError(
            f"unknown env id {env_id!r} ({exc}): use a registered gymnasium id such as "
            "CartPole-v1, or install the package that registers it"
        ) from None


def is_atari(env_id: str) -> bool:
    return env_id.startswith("ALE/")


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
    kwargs: dict = {}
    wrappers: list = []
    check_env_id(env_id)
    if is_atari(env_id):
        kwargs = {"frameskip": 1, "repeat_action_probability": e.sticky_actions}
        wrappers = [
            lambda env: gym.wrappers.AtariPreprocessing(
                env, noop_max=e.noop_max, frame_skip=e.frame_skip, screen_size=84, grayscale_obs=True
            ),
            lambda env: gym.wrappers.FrameStackObservation(env, e.frame_stack),
        ]
    env = gym.make_vec(
        env_id,
        num_envs=num_envs,
        vectorization_mode="async" if asynchronous else "sync",
        vector_kwargs={"autoreset_mode": AutoresetMode.NEXT_STEP},
        wrappers=wrappers,
        **kwargs,
    )
    space = env.single_action_space
    box = isinstance(space, gym.spaces.Box) and len(space.shape) == 1 and np.isfinite(space.low).all()
    if not (isinstance(space, gym.spaces.Discrete) or box):
        raise UserError(
            f"env {env_id!r} has action space {space}: canopy acts in Discrete spaces (dqn) "
            "and bounded 1-D Box spaces (td3)"
        )
    return gym.wrappers.vector.RecordEpisodeStatistics(env)


@dataclass(frozen=True)
class EnvSpec:
    """What the learner needs to know of an env as actors build it."""

    obs_shape: tuple[int, ...]
    obs_dtype: str  # numpy dtype name
    actions: int  # Discrete: number of actions; Box: action dimensions
    discrete: bool


def env_spec(env_id: str, env_cfg: EnvConfig | None = None) -> EnvSpec:
    env = make_vec(env_id, 1, env_cfg)
    try:
        obs, act = env.single_observation_space, env.single_action_space
        discrete = isinstance(act, gym.spaces.Discrete)
        return EnvSpec(tuple(obs.shape), str(obs.dtype), int(act.n) if discrete else act.shape[0], discrete)
    finally:
        env.close()


def random_stepping_rate(env_id: str, num_envs: int, seconds: float) -> float:
    """Env steps/s of a vector env stepped with random actions: an actor's ceiling."""
    env = make_vec(env_id, num_envs)
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
