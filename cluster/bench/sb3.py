"""The Stable-Baselines3 side of `canopy bench zoo`: one algorithm, one env, one seed, JSON on stdout.

`canopy bench zoo` runs `python -m cluster.bench.sb3 --env ID --algo ppo --seed S --budget-s B
--started-at T ...` once per SB3 algorithm, one after another, so that each trains alone on the
machine. The run:

- builds the model with the rl-baselines3-zoo hyperparameters of the env (`ZOO` below; envs
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

SCREEN_EPISODES = 10
CONFIRM_EPISODES = 100
# Screens per zoo schedule: each costs SCREEN_EPISODES episodes (10 x 500 steps on a solved
# CartPole, about a second of batched predicts), so ~25 of them keep the curve readable for a
# few percent of a run. SCREEN_SHARE caps their cost where n_timesteps is far beyond the budget.
SCREENS_PER_SCHEDULE = 25
MIN_SCREEN_EVERY = 1000
SCREEN_SHARE = 0.15  # the most of the elapsed time screens may take before the next one waits
EVAL_BATCH = 10  # episodes stepped side by side, so the policy's forward pass runs batched

# The zoo gives LunarLander-v3 and Acrobot-v1 the same DQN entry.
_DQN_LUNAR_ACROBOT = {
    "n_timesteps": 1e5,
    "learning_rate": 6.3e-4,
    "batch_size": 128,
    "buffer_size": 50000,
    "learning_starts": 0,
    "gamma": 0.99,
    "target_update_interval": 250,
    "train_freq": 4,
    "gradient_steps": -1,
    "exploration_fraction": 0.12,
    "exploration_final_eps": 0.1,
    "policy_kwargs": {"net_arch": [256, 256]},
}

# rl-baselines3-zoo hyperparameters, copied from hyperparams/ppo.yml, dqn.yml, sac.yml and
# td3.yml of github.com/DLR-RM/rl-baselines3-zoo at commit 22e3ff2 (2026-04-23). Values keep
# the zoo's spelling: "lin_X" is its linear_schedule (X * progress_remaining), noise_type and
# noise_std build the action noise, normalize wraps the training env in VecNormalize (gamma =
# the algorithm's), policy_kwargs are the zoo's dict(...) strings as dicts. "default" is the
# zoo's entry for envs it does not list.
ZOO: dict[str, dict[str, dict[str, Any]]] = {
    "ppo": {
        "default": {"n_timesteps": 1e6},
        "CartPole-v1": {
            "n_envs": 8,
            "n_timesteps": 1e5,
            "n_steps": 32,
            "batch_size": 256,
            "gae_lambda": 0.8,
            "gamma": 0.98,
            "n_epochs": 20,
            "ent_coef": 0.0,
            "learning_rate": "lin_0.001",
            "clip_range": "lin_0.2",
        },
        "Pendulum-v1": {
            "n_envs": 4,
            "n_timesteps": 1e5,
            "n_steps": 1024,
            "gae_lambda": 0.95,
            "gamma": 0.9,
            "n_epochs": 10,
            "ent_coef": 0.0,
            "learning_rate": 1e-3,
            "clip_range": 0.2,
            "use_sde": True,
            "sde_sample_freq": 4,
        },
        "Acrobot-v1": {
            "normalize": True,
            "n_envs": 16,
            "n_timesteps": 1e6,
            "n_steps": 256,
            "gae_lambda": 0.94,
            "gamma": 0.99,
            "n_epochs": 4,
            "ent_coef": 0.0,
        },
        "MountainCar-v0": {
            "normalize": True,
            "n_envs": 16,
            "n_timesteps": 1e6,
            "n_steps": 16,
            "gae_lambda": 0.98,
            "gamma": 0.99,
            "n_epochs": 4,
            "ent_coef": 0.0,
        },
        "MountainCarContinuous-v0": {
            "normalize": True,
            "n_envs": 1,
            "n_timesteps": 20000,
            "batch_size": 256,
            "n_steps": 8,
            "gamma": 0.9999,
            "learning_rate": 7.77e-05,
            "ent_coef": 0.00429,
            "clip_range": 0.1,
            "n_epochs": 10,
            "gae_lambda": 0.9,
            "max_grad_norm": 5,
            "vf_coef": 0.19,
            "use_sde": True,
            "policy_kwargs": {"log_std_init": -3.29, "ortho_init": False},
        },
        "LunarLander-v3": {
            "n_envs": 16,
            "n_timesteps": 1e6,
            "n_steps": 1024,
            "batch_size": 64,
            "gae_lambda": 0.98,
            "gamma": 0.999,
            "n_epochs": 4,
            "ent_coef": 0.01,
        },
        "LunarLanderContinuous-v3": {
            "n_envs": 16,
            "n_timesteps": 1e6,
            "n_steps": 1024,
            "batch_size": 64,
            "gae_lambda": 0.98,
            "gamma": 0.999,
            "n_epochs": 4,
            "ent_coef": 0.01,
        },
    },
    "dqn": {
        "default": {"n_timesteps": 1e6},
        "CartPole-v1": {
            "n_timesteps": 5e4,
            "learning_rate": 2.3e-3,
            "batch_size": 64,
            "buffer_size": 100000,
            "learning_starts": 1000,
            "gamma": 0.99,
            "target_update_interval": 10,
            "train_freq": 256,
            "gradient_steps": 128,
            "exploration_fraction": 0.16,
            "exploration_final_eps": 0.04,
            "policy_kwargs": {"net_arch": [256, 256]},
        },
        "MountainCar-v0": {
            "n_timesteps": 1.2e5,
            "learning_rate": 4e-3,
            "batch_size": 128,
            "buffer_size": 10000,
            "learning_starts": 1000,
            "gamma": 0.98,
            "target_update_interval": 600,
            "train_freq": 16,
            "gradient_steps": 8,
            "exploration_fraction": 0.2,
            "exploration_final_eps": 0.07,
            "policy_kwargs": {"net_arch": [256, 256]},
        },
        "LunarLander-v3": _DQN_LUNAR_ACROBOT,
        "Acrobot-v1": _DQN_LUNAR_ACROBOT,
    },
    "sac": {
        "default": {"n_timesteps": 1e6},
        "Pendulum-v1": {"n_timesteps": 20000, "learning_rate": 1e-3},
        "MountainCarContinuous-v0": {
            "n_timesteps": 50000,
            "learning_rate": 3e-4,
            "buffer_size": 50000,
            "batch_size": 512,
            "ent_coef": 0.1,
            "train_freq": 32,
            "gradient_steps": 32,
            "gamma": 0.9999,
            "tau": 0.01,
            "learning_starts": 0,
            "use_sde": True,
            "policy_kwargs": {"log_std_init": -3.67, "net_arch": [64, 64]},
        },
        "LunarLanderContinuous-v3": {
            "n_timesteps": 5e5,
            "batch_size": 256,
            "learning_rate": "lin_7.3e-4",
            "buffer_size": 1000000,
            "ent_coef": "auto",
            "gamma": 0.99,
            "tau": 0.01,
            "train_freq": 1,
            "gradient_steps": 1,
            "learning_starts": 10000,
            "policy_kwargs": {"net_arch": [400, 300]},
        },
    },
    "td3": {
        "default": {
            "n_timesteps": 1e6,
            "train_freq": 1,
            "gradient_steps": 1,
            "noise_type": "normal",
            "noise_std": 0.1,
        },
        "Pendulum-v1": {
            "n_timesteps": 20000,
            "gamma": 0.98,
            "buffer_size": 200000,
            "learning_starts": 10000,
            "noise_type": "normal",
            "noise_std": 0.1,
            "gradient_steps": 1,
            "train_freq": 1,
            "learning_rate": 1e-3,
            "policy_kwargs": {"net_arch": [400, 300]},
        },
        "MountainCarContinuous-v0": {
            "n_timesteps": 300000,
            "noise_type": "ornstein-uhlenbeck",
            "noise_std": 0.5,
            "gradient_steps": 1,
            "train_freq": 1,
            "learning_rate": 1e-3,
            "batch_size": 256,
            "policy_kwargs": {"net_arch": [400, 300]},
        },
        "LunarLanderContinuous-v3": {
            "n_timesteps": 3e5,
            "gamma": 0.98,
            "buffer_size": 200000,
            "learning_starts": 10000,
            "noise_type": "normal",
            "noise_std": 0.1,
            "gradient_steps": 1,
            "train_freq": 1,
            "learning_rate": 1e-3,
            "policy_kwargs": {"net_arch": [400, 300]},
        },
    },
}
ZOO_SOURCE = "rl-baselines3-zoo hyperparams/{algo}.yml @ 22e3ff2"

# Which SB3 algorithms fit an action space, as rl-zoo would run them.
ALGOS = {"discrete": ("ppo", "dqn"), "box": ("ppo", "sac", "td3")}


def zoo_hyperparams(algo: str, env_id: str) -> tuple[dict[str, Any], str]:
    """The zoo's hyperparameters of `algo` on `env_id` and where they came from (a note if defaulted)."""
    table = ZOO[algo]
    if env_id in table:
        return dict(table[env_id]), ZOO_SOURCE.format(algo=algo)
    return dict(table["default"]), (
        f"{env_id} has no entry in {ZOO_SOURCE.format(algo=algo)}: SB3 defaults "
        "(the zoo's `default` entry, n_timesteps 1e6)"
    )


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
    return max(n_timesteps // SCREENS_PER_SCHEDULE, MIN_SCREEN_EVERY)


def run_episodes(
    env_id: str, act: Callable[[np.ndarray], np.ndarray], episodes: int, seed: int, batch: int = EVAL_BATCH
) -> list[float]:
    """Returns of `episodes` episodes, episode i reset with seed `seed + i` (as `canopy eval` does).

    `batch` envs step side by side so `act` sees a batch of observations: SB3's predict costs
    about as much for 10 rows as for one.
    """
    import gymnasium as gym

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
    r = np.asarray(returns, dtype=np.float64)
    return {
        "episodes": len(returns),
        "mean_return": round(float(r.mean()), 3),
        "std_return": round(float(r.std()), 3),
        "min_return": round(float(r.min()), 3),
        "max_return": round(float(r.max()), 3),
    }


def train(args: argparse.Namespace) -> dict[str, Any]:
    """One budgeted SB3 run (see the module docstring); the dict is what main prints."""
    import gymnasium as gym
    import stable_baselines3
    import torch
    from stable_baselines3 import DQN, PPO, SAC, TD3
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    if args.threads > 0:
        torch.set_num_threads(args.threads)

    def elapsed() -> float:
        return time.time() - args.started_at

    params, source = zoo_hyperparams(args.algo, args.env)
    own, kwargs = split_hyperparams(params)
    n_timesteps = int(own.get("n_timesteps", 1e6))
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
    model = cls(own.get("policy", "MlpPolicy"), env, seed=args.seed, verbose=0, **kwargs)

    def act_with(obs_rms: Any) -> Callable[[np.ndarray], np.ndarray]:
        def act(obs: np.ndarray) -> np.ndarray:
            if obs_rms is not None and norm is not None:  # the training env's statistics, frozen
                scaled = (obs - obs_rms.mean) / np.sqrt(obs_rms.var + norm.epsilon)
                obs = np.clip(scaled, -norm.clip_obs, norm.clip_obs)
            return model.predict(obs, deterministic=True)[0]

        return act

    every = screen_every(n_timesteps)
    budget = args.budget_s
    curve: list[dict[str, Any]] = []
    state: dict[str, Any] = {"best": None, "best_params": None, "solve": None, "screen_s": 0.0}

    def screen(steps: int) -> None:
        t = time.time()
        rms = copy.deepcopy(norm.obs_rms) if norm is not None else None
        base = 1_000_000 + 100_000 * args.seed + len(curve) * CONFIRM_EPISODES
        mean = float(np.mean(run_episodes(args.env, act_with(rms), SCREEN_EPISODES, base)))
        point = {"wall_s": round(elapsed(), 2), "env_steps": steps, "mean": mean}
        curve.append({**point, "episodes": SCREEN_EPISODES})
        if state["best"] is None or mean > state["best"]["mean"]:
            state["best"] = point
            params_now = {k: v.detach().clone() for k, v in model.policy.state_dict().items()}
            state["best_params"] = (params_now, rms)
        threshold = args.threshold
        if threshold is not None and state["solve"] is None and mean >= threshold and elapsed() < budget:
            confirm = float(np.mean(run_episodes(args.env, act_with(rms), CONFIRM_EPISODES, base + 50_000)))
            point = {"wall_s": round(elapsed(), 2), "env_steps": steps, "mean": confirm}
            curve.append({**point, "episodes": CONFIRM_EPISODES, "confirm": True})
            # A confirmation that ends after the budget is one the run did not have time for.
            if confirm >= threshold and point["wall_s"] <= budget:
                state["solve"] = point
        state["screen_s"] += time.time() - t

    class Clock(BaseCallback):
        """Stops at the budget; screens every `every` env steps unless screening ran over its share."""

        last = 0

        def _on_step(self) -> bool:
            if elapsed() >= budget:
                return False
            due = self.num_timesteps - self.last >= every
            if due and state["screen_s"] <= SCREEN_SHARE * elapsed():
                self.last = self.num_timesteps
                screen(self.num_timesteps)
            return elapsed() < budget

    clock = Clock()
    model.learn(total_timesteps=n_timesteps, callback=clock)
    steps = int(model.num_timesteps)
    stopped = "budget" if elapsed() >= budget else "n_timesteps"
    if stopped == "n_timesteps" and clock.last != steps:
        screen(steps)  # the schedule's end, while the budget lasts: the final model may be the best
    train_s = round(elapsed(), 2)

    note = ""
    if state["best_params"] is not None:
        params_best, rms_best = state["best_params"]
        model.policy.load_state_dict(params_best)
        handed = {"from": "best screen", **state["best"]}
    else:
        rms_best = copy.deepcopy(norm.obs_rms) if norm is not None else None
        handed = {"from": "final model", "env_steps": steps}
        note = "the budget ran out before the first screen: the final model is handed over"
    score = stats(run_episodes(args.env, act_with(rms_best), args.score_episodes, args.score_seed))
    solve = state["solve"]
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
        "screen_s": round(state["screen_s"], 2),
        "env_steps": steps,
        "threshold": args.threshold,
        "solved": solve is not None,
        "time_to_solve_s": solve["wall_s"] if solve else None,
        "env_steps_to_solve": solve["env_steps"] if solve else None,
        "solve_mean": solve["mean"] if solve else None,
        "handed_over": handed,
        "score": {**score, "seed": args.score_seed},
        "curve": curve,
        "torch_threads": torch.get_num_threads(),
        "device": str(model.device),
        "versions": {"stable_baselines3": stable_baselines3.__version__, "torch": torch.__version__},
        **({"note": note} if note else {}),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cluster.bench.sb3", description=__doc__.splitlines()[0])
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
    args = parse_args(argv)
    result = train(args)
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
