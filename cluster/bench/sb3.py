"""The Stable-Baselines3 side of `canopy bench zoo`: one algorithm, one env, one seed, JSON on stdout.

`canopy bench zoo` runs `python -m canopy.cluster.bench.sb3 --env ID --algo ppo --seed S --budget-s B
--started-at T ...` once per SB3 algorithm, one after another, so that each trains alone on the
machine. The run:

- builds the model with the rl-baselines3-zoo hyperparameters of the env (`ZOO` in rlzoo.py; envs
  missing there get rl-zoo's `default` entry, i.e. SB3's defaults, and a note in the JSON);
- trains until the wall-clock budget runs out or the zoo's `n_timesteps` is reached, whichever
  comes first. The clock starts at `--started-at` (the parent's time just before it started
  this process), so imports, env and model construction and every evaluation count. The
  schedules (linear learning rate, clip range, DQN's epsilon) stay defined over `n_timesteps`,
  as in rl-zoo, even when the budget stops the run first;
- screens the model every `screen_every` env steps with SCREEN_EPISODES deterministic
  episodes and keeps the best-screening parameters as the hand-over model, as rl-zoo's
  EvalCallback keeps best_model. A screen at or above the threshold is confirmed over
  CONFIRM_EPISODES more; the first confirmation at or above it (finished within the budget)
  is the run's confirmed solve;
- after the budget, scores the hand-over model over `--score-episodes` episodes, episode i
  reset with seed `--score-seed + i` exactly as `canopy eval` does (not counted in the budget).

SB3 is an optional dependency (`pip install 'canopy-rl[bench]'`): it is imported only inside
`train`, so the tables and helpers here import without it.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from canopy.cluster.bench.rlzoo import ZOO, zoo_hyperparams

SCREEN_EPISODES = 10
CONFIRM_EPISODES = 100
# Screens per zoo schedule: each costs SCREEN_EPISODES episodes (10 x 500 steps on a solved
# CartPole, about a second of batched predicts), so ~25 of them keep the curve readable for a
# few percent of a run. SCREEN_SHARE caps their cost where n_timesteps is far beyond the budget.
SCREENS_PER_SCHEDULE = 25
MIN_SCREEN_EVERY = 1000
SCREEN_SHARE = 0.15  # the most of the elapsed time screens may take before the next one waits
EVAL_BATCH = 10  # episodes stepped side by side, so the policy's forward pass runs batched


def schedule(value: Any) -> Any:
    """A zoo value as SB3 takes it: "lin_X" becomes X * progress_remaining (the zoo's linear_schedule)."""
    if isinstance(value, str) and value.startswith("lin_"):
        from stable_baselines3.common.utils import LinearSchedule

        # start at progress_remaining 1, 0 at progress_remaining 0: X * progress_remaining
        return LinearSchedule(float(value[4:]), 0.0, 1.0)
    return value


def split_hyperparams(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(what this module handles itself: n_envs, n_timesteps, normalize, noise; the model's kwargs)."""
    own_keys = ("n_envs", "n_timesteps", "normalize", "noise_type", "noise_std", "policy")
    own = {k: params[k] for k in own_keys if k in params}
    kwargs = {k: schedule(v) for k, v in params.items() if k not in own_keys}
    return own, kwargs


def action_noise(own: dict[str, Any], actions: int) -> Any:
    """The zoo's noise_type/noise_std as an SB3 action noise object (None without them)."""
    kind = own.get("noise_type")
    if kind is None:
        return None
    from stable_baselines3.common.noise import NormalActionNoise, OrnsteinUhlenbeckActionNoise

    std = float(own.get("noise_std", 0.1)) * np.ones(actions)
    if "normal" in kind:
        return NormalActionNoise(mean=np.zeros(actions), sigma=std)
    if "ornstein-uhlenbeck" in kind:
        return OrnsteinUhlenbeckActionNoise(mean=np.zeros(actions), sigma=std)
    raise ValueError(f"unknown noise_type {kind!r}")


def screen_every(n_timesteps: int) -> int:
    """Env steps between screens: SCREENS_PER_SCHEDULE per zoo schedule, at least MIN_SCREEN_EVERY."""
    return max(n_timesteps // SCREENS_PER_SCHEDULE, MIN_SCREEN_EVERY)


def run_episodes(
    env_id: str, act: Callable[[np.ndarray], np.ndarray], episodes: int, seed: int, batch: int = EVAL_BATCH
) -> list[float]:
    """Returns of `episodes` episodes, episode i reset with seed `seed + i` (as `canopy eval` does).

    `batch` envs step side by side so `act` sees a batch of observations: SB3's predict costs
    about as much for 10 rows as for one.
    """
    import gymnasium as gym

    from canopy import tasks

    tasks.register()  # canopy's own ids (canopy/CartPoleNoVelocity-v1), in this process too
    envs = [gym.make(env_id) for _ in range(min(batch, episodes))]
    returns = [0.0] * episodes
    episode_of: dict[int, int] = {}  # env slot -> episode it is playing
    obs: dict[int, Any] = {}
    for j, env in enumerate(envs):
        obs[j] = env.reset(seed=seed + j)[0]
        episode_of[j] = j
    started = len(envs)
    try:
        while obs:
            slots = list(obs)
            actions = act(np.stack([np.asarray(obs[j]) for j in slots]))
            for j, action in zip(slots, actions, strict=True):
                o, reward, terminated, truncated, _ = envs[j].step(action)
                returns[episode_of[j]] += float(reward)
                if not (terminated or truncated):
                    obs[j] = o
                elif started < episodes:
                    episode_of[j] = started
                    obs[j] = envs[j].reset(seed=seed + started)[0]
                    started += 1
                else:
                    del obs[j]
    finally:
        for env in envs:
            env.close()
    return returns


def stats(returns: list[float]) -> dict[str, float]:
    """Episode count and mean, std, min and max of `returns`, rounded for the JSON."""
    r = np.asarray(returns, dtype=np.float64)
    return {
        "episodes": len(returns),
        "mean_return": round(float(r.mean()), 3),
        "std_return": round(float(r.std()), 3),
        "min_return": round(float(r.min()), 3),
        "max_return": round(float(r.max()), 3),
    }


def build(args: argparse.Namespace, own: dict[str, Any], kwargs: dict[str, Any]) -> tuple[Any, Any]:
    """The model of `args.algo` on its training env, as rl-zoo builds it: (model, the
    VecNormalize wrapper or None)."""
    import gymnasium as gym
    from stable_baselines3 import DQN, PPO, SAC, TD3
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    from canopy import tasks

    tasks.register()  # canopy's own ids (canopy/CartPoleNoVelocity-v1), in this process too
    env = make_vec_env(args.env, n_envs=int(own.get("n_envs", 1)), seed=args.seed)
    norm: VecNormalize | None = None
    if own.get("normalize"):
        # The zoo's normalize: obs and reward, discounted with the algorithm's gamma.
        norm = VecNormalize(env, gamma=kwargs.get("gamma", 0.99))
        env = norm
    space = env.action_space
    if isinstance(space, gym.spaces.Box):
        noise = action_noise(own, space.shape[0])
        if noise is not None:
            kwargs["action_noise"] = noise
    cls = {"ppo": PPO, "dqn": DQN, "sac": SAC, "td3": TD3}[args.algo]
    return cls(own.get("policy", "MlpPolicy"), env, seed=args.seed, verbose=0, **kwargs), norm


class Screens:
    """The screens of one run: its curve, the best-screening parameters (the hand-over, as
    rl-zoo's EvalCallback keeps best_model) and the first confirmed solve."""

    def __init__(self, args: argparse.Namespace, model: Any, norm: Any, elapsed: Callable[[], float]):
        self.args, self.model, self.norm, self.elapsed = args, model, norm, elapsed
        self.curve: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.best_params: tuple[dict[str, Any], Any] | None = None
        self.solve: dict[str, Any] | None = None
        self.seconds = 0.0  # spent screening, counted against SCREEN_SHARE

    def act_with(self, obs_rms: Any) -> Callable[[np.ndarray], np.ndarray]:
        """Deterministic actions, observations scaled with `obs_rms` (the training env's, frozen)."""
        norm = self.norm

        def act(obs: np.ndarray) -> np.ndarray:
            if obs_rms is not None and norm is not None:
                scaled = (obs - obs_rms.mean) / np.sqrt(obs_rms.var + norm.epsilon)
                obs = np.clip(scaled, -norm.clip_obs, norm.clip_obs)
            return self.model.predict(obs, deterministic=True)[0]

        return act

    def screen(self, steps: int) -> None:
        """Screen the model now; confirm a screen at the threshold while the budget lasts."""
        t = time.time()
        args, budget = self.args, self.args.budget_s
        rms = copy.deepcopy(self.norm.obs_rms) if self.norm is not None else None
        base = 1_000_000 + 100_000 * args.seed + len(self.curve) * CONFIRM_EPISODES
        mean = float(np.mean(run_episodes(args.env, self.act_with(rms), SCREEN_EPISODES, base)))
        point = {"wall_s": round(self.elapsed(), 2), "env_steps": steps, "mean": mean}
        self.curve.append({**point, "episodes": SCREEN_EPISODES})
        if self.best is None or mean > self.best["mean"]:
            self.best = point
            params_now = {k: v.detach().clone() for k, v in self.model.policy.state_dict().items()}
            self.best_params = (params_now, rms)
        threshold = args.threshold
        if threshold is not None and self.solve is None and mean >= threshold and self.elapsed() < budget:
            confirm = float(
                np.mean(run_episodes(args.env, self.act_with(rms), CONFIRM_EPISODES, base + 50_000))
            )
            point = {"wall_s": round(self.elapsed(), 2), "env_steps": steps, "mean": confirm}
            self.curve.append({**point, "episodes": CONFIRM_EPISODES, "confirm": True})
            # A confirmation that ends after the budget is one the run did not have time for.
            if confirm >= threshold and point["wall_s"] <= budget:
                self.solve = point
        self.seconds += time.time() - t

    def hand_over(self, steps: int) -> tuple[dict[str, Any], Any, str]:
        """Load the best-screening parameters into the model: (what was handed over, its
        observation statistics, a note when there was no screen to choose from)."""
        if self.best_params is not None:
            params_best, rms_best = self.best_params
            self.model.policy.load_state_dict(params_best)
            return {"from": "best screen", **self.best}, rms_best, ""
        rms_best = copy.deepcopy(self.norm.obs_rms) if self.norm is not None else None
        note = "the budget ran out before the first screen: the final model is handed over"
        return {"from": "final model", "env_steps": steps}, rms_best, note


def train(args: argparse.Namespace) -> dict[str, Any]:
    """One budgeted SB3 run (see the module docstring); the dict is what main prints."""
    import stable_baselines3
    import torch
    from stable_baselines3.common.callbacks import BaseCallback

    if args.threads > 0:
        torch.set_num_threads(args.threads)

    def elapsed() -> float:
        return time.time() - args.started_at

    params, source = zoo_hyperparams(args.algo, args.env)
    own, kwargs = split_hyperparams(params)
    n_timesteps = int(own.get("n_timesteps", 1e6))
    model, norm = build(args, own, kwargs)
    every = screen_every(n_timesteps)
    budget = args.budget_s
    screens = Screens(args, model, norm, elapsed)

    class Clock(BaseCallback):
        """Stops at the budget; screens every `every` env steps unless screening ran over its share."""

        last = 0

        def _on_step(self) -> bool:
            if elapsed() >= budget:
                return False
            due = self.num_timesteps - self.last >= every
            if due and screens.seconds <= SCREEN_SHARE * elapsed():
                self.last = self.num_timesteps
                screens.screen(self.num_timesteps)
            return elapsed() < budget

    clock = Clock()
    model.learn(total_timesteps=n_timesteps, callback=clock)
    steps = int(model.num_timesteps)
    stopped = "budget" if elapsed() >= budget else "n_timesteps"
    if stopped == "n_timesteps" and clock.last != steps:
        screens.screen(steps)  # the schedule's end, while the budget lasts: the final model may be the best
    train_s = round(elapsed(), 2)
    handed, rms_best, note = screens.hand_over(steps)
    score = stats(run_episodes(args.env, screens.act_with(rms_best), args.score_episodes, args.score_seed))
    solve = screens.solve
    return {
        "algo": args.algo,
        "env": args.env,
        "seed": args.seed,
        "hyperparameters": params,
        "hyperparameters_source": source,
        "n_timesteps": n_timesteps,
        "screen_every": every,
        "budget_s": budget,
        "stopped": stopped,
        "train_s": train_s,
        "screen_s": round(screens.seconds, 2),
        "env_steps": steps,
        "threshold": args.threshold,
        "solved": solve is not None,
        "time_to_solve_s": solve["wall_s"] if solve else None,
        "env_steps_to_solve": solve["env_steps"] if solve else None,
        "solve_mean": solve["mean"] if solve else None,
        "handed_over": handed,
        "score": {**score, "seed": args.score_seed},
        "curve": screens.curve,
        "torch_threads": torch.get_num_threads(),
        "device": str(model.device),
        "versions": {"stable_baselines3": stable_baselines3.__version__, "torch": torch.__version__},
        **({"note": note} if note else {}),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line `canopy bench zoo` passes; without `--started-at`, the clock starts now."""
    p = argparse.ArgumentParser(
        prog="python -m canopy.cluster.bench.sb3", description=__doc__.splitlines()[0]
    )
    p.add_argument("--env", required=True)
    p.add_argument("--algo", required=True, choices=sorted(ZOO))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget-s", type=float, required=True)
    p.add_argument("--started-at", type=float, default=None, help="time.time() the clock counts from")
    p.add_argument("--threshold", type=float, default=None, help="confirmed-solve threshold (none: no solve)")
    p.add_argument("--score-episodes", type=int, default=CONFIRM_EPISODES)
    p.add_argument("--score-seed", type=int, default=10_000)
    # One intra-op thread, as canopy's learner (learner.threads = 1): on these small MLPs a
    # second thread costs more in synchronisation than it gains (128 DQN CartPole gradient
    # steps: 0.24-0.37 s at 1 thread, 0.91-0.98 s at 2 on the shared 2-core bench machine).
    # rl-zoo's own default (--num-threads -1) leaves torch's count alone: pass 0 for that.
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.started_at is None:
        args.started_at = time.time()
    return args


def main(argv: list[str] | None = None) -> int:
    """Train and score one run; its result as one JSON line on stdout."""
    args = parse_args(argv)
    result = train(args)
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
