"""The rl-baselines3-zoo hyperparameters `canopy bench zoo` gives Stable-Baselines3.

Place: data for sb3.py (which builds each model from them) and zoo.py (which lists the
algorithms per action space and reports the hyperparameters beside each result). Kept
apart from both so the table reads as the zoo's files do, and so importing it needs no SB3.
"""

from __future__ import annotations

from typing import Any

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
        # The zoo's `mujoco-defaults` anchor, which its HalfCheetah-v3/v4 entries use.
        "HalfCheetah-v5": {"n_timesteps": 1e6, "learning_starts": 10000},
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
