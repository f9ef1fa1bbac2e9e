"""What depends on the chosen algorithm in the config: its defaults, and for the on-policy
ones (ppo, impala) the replay queue their unrolls travel through (r2d2's sequences use the
prioritized main table).

Place in the data flow: canopy/config.py `load` fills in `ALGORITHM_DEFAULTS` of
`learner.algorithm` before it builds the tree (a key the TOML file or an override sets
wins); its `verify` calls `algorithm_problems` for what an on-policy learner needs of the
queue and what r2d2's sequences need. Actors (actors/actor.py) and the learner
(learner/role.py) name the `UNROLLS` table from here.
"""

from __future__ import annotations

from typing import Any

# On-policy algorithms: actors send unrolls (actors/unroll.py) to this replay table, a queue
# (fifo sampler and remover, each item sampled once): a learner that falls behind makes
# actors wait instead of training on ever older data.
ON_POLICY = ("ppo", "impala")
UNROLLS = "unrolls"

# Defaults of the settings an algorithm needs other than the tree's (which are DQN's), for
# every key neither the TOML file nor an override sets. From rl-baselines3-zoo's CartPole
# PPO (8 x 32 steps a batch, 20 epochs, GAE 0.8, gamma 0.98, lr 1e-3), and for IMPALA
# from Espeholt et al. 2018 and RLlib's CartPole example (entropy 0.01, clip 40).
_ON_POLICY_DEFAULTS: dict[str, Any] = {
    "learner.hidden": [64, 64],
    "learner.layer_norm": False,
    "learner.batch_size": 8,  # unrolls per batch
    "learner.unroll_length": 32,
    "learner.publish_every": 1,  # every update is a new policy: actors should act with it
    "learner.samples_in_flight": 1,  # batches prefetched are batches that age
    "replay.extra_tables": [f"{UNROLLS}:fifo:fifo:1:32"],
    "replay.samples_per_insert": 0.0,  # the queue limits itself (its capacity)
    "replay.min_size": 1,
    "actors.envs": 8,
}
ALGORITHM_DEFAULTS: dict[str, dict[str, Any]] = {
    "ppo": {
        **_ON_POLICY_DEFAULTS,
        # One batch in the queue and one chunk in flight per actor: the epochs train on data
        # at most a few versions old (a lag of 8 versions instead of 17 with 32 and 4 in
        # flight), which solved CartPole in a median 7.9 s instead of 10.6 s over 5 seeds.
        "replay.extra_tables": [f"{UNROLLS}:fifo:fifo:1:8"],
        "actors.inflight_chunks": 1,
        "learner.lr": 1e-3,
        "learner.lr_final": 1e-4,
        "learner.lr_anneal_updates": 400,
        "learner.clip_range_final": 0.05,
        "learner.gamma": 0.98,
        "learner.gae_lambda": 0.8,
        "learner.epochs": 20,
        "learner.minibatch_size": 256,
        "learner.max_grad_norm": 0.5,
    },
    "impala": {
        **_ON_POLICY_DEFAULTS,
        # One gradient step per batch: 32 x 32 steps keep the updates (and so the versions the
        # actors' policy lags behind) few enough on a small machine; 8 unrolls a batch made
        # 90 updates a second, a lag of 16 versions, and CartPole's policy collapsed.
        "learner.batch_size": 32,
        "replay.extra_tables": [f"{UNROLLS}:fifo:fifo:1:128"],
        # 5e-4: still learns with actors 16 versions behind (1e-3 collapsed there).
        "learner.lr": 5e-4,
        "learner.lr_anneal_updates": 0,
        "learner.ent_coef": 0.01,
        "learner.max_grad_norm": 40.0,
    },
    # Recurrent DQN (Kapturowski et al. 2019) scaled down to CartPoleNoVelocity: sequences of
    # 40 steps overlapping by 20 with a burn-in of 10 (two steps already reveal the velocities
    # the observation hides), a hard target copy every 100 updates, n = 3.
    "r2d2": {
        "learner.hidden": [64, 64],  # a linear layer of 64, then an LSTM of 64 units
        "learner.layer_norm": False,
        "learner.batch_size": 32,  # sequences per batch
        "learner.unroll_length": 40,
        "learner.overlap": 20,
        "learner.burn_in": 10,
        "learner.lr": 1e-3,
        "learner.lr_anneal_updates": 0,
        "learner.tau": 1.0,
        "learner.target_update_period": 100,
        "learner.publish_every": 10,
        "replay.sampler": "prioritized",
        "replay.priority_exponent": 0.9,  # the paper's alpha
        "replay.importance_exponent": 0.6,
        "replay.importance_exponent_final": 0.6,
        "replay.capacity": 20_000,  # sequences: 400k env steps
        "replay.min_size": 64,
        "replay.samples_per_insert": 4.0,  # sequences sampled per sequence inserted
        "replay.error_buffer": 2_000.0,
        "actors.chunk": 8,  # sequences per insert
    },
}


def algorithm_defaults(data: dict[str, Any]) -> None:
    """Fill in the chosen algorithm's defaults (ALGORITHM_DEFAULTS) where `data` is silent."""
    learner = data.get("learner")
    name = learner.get("algorithm") if isinstance(learner, dict) else None
    for key, value in ALGORITHM_DEFAULTS.get(name, {}).items() if isinstance(name, str) else ():
        section, _, leaf = key.partition(".")
        part = data.setdefault(section, {})
        if isinstance(part, dict) and leaf not in part:
            part[leaf] = value


def algorithm_problems(cfg: Any) -> list[str]:
    """One line per setting the chosen algorithm cannot work with (`cfg`: canopy/config.py's
    tree, typed loosely here because that module imports this one)."""
    return _on_policy_problems(cfg) + _r2d2_problems(cfg)


def _on_policy_problems(cfg: Any) -> list[str]:
    """One line per setting an on-policy learner cannot work with (none for dqn, td3, sac)."""
    if cfg.learner.algorithm not in ON_POLICY:
        return []
    lc, name = cfg.learner, cfg.learner.algorithm
    problems = []
    if cfg.replay.sampler == "prioritized":
        problems.append(
            f"replay.sampler = 'prioritized' does not fit learner.algorithm = {name!r}: "
            "on-policy unrolls are read once, oldest first; remove the setting"
        )
    queues = [e for e in cfg.replay.extra_tables if e.split(":")[0] == UNROLLS]
    parts = queues[0].split(":") if len(queues) == 1 else []
    if len(parts) != 5 or parts[1:4] != ["fifo", "fifo", "1"] or not parts[4].isdigit():
        return [
            *problems,
            f"learner.algorithm = {name!r} reads unrolls from a queue: replay.extra_tables needs "
            f"exactly one entry '{UNROLLS}:fifo:fifo:1:<capacity>'",
        ]
    capacity = int(parts[4])
    if capacity < max(lc.batch_size, cfg.actors.envs):
        problems.append(
            f"the {UNROLLS} queue holds {capacity} unrolls, fewer than learner.batch_size "
            f"({lc.batch_size}) or actors.envs ({cfg.actors.envs}): raise its capacity"
        )
    if name == "ppo" and lc.minibatch_size > lc.batch_size * lc.unroll_length:
        problems.append(
            f"learner.minibatch_size = {lc.minibatch_size} exceeds a batch's "
            f"{lc.batch_size * lc.unroll_length} env steps (batch_size x unroll_length)"
        )
    return problems


def _r2d2_problems(cfg: Any) -> list[str]:
    """One line per setting r2d2's sequences cannot work with (none for other algorithms)."""
    lc = cfg.learner
    if lc.algorithm != "r2d2":
        return []
    problems = []
    if lc.overlap >= lc.unroll_length:
        problems.append(
            f"learner.overlap = {lc.overlap} must be below learner.unroll_length = {lc.unroll_length} "
            "(r2d2's sequence length)"
        )
    if lc.burn_in >= lc.unroll_length:
        problems.append(
            f"learner.burn_in = {lc.burn_in} leaves nothing to learn from in sequences of "
            f"learner.unroll_length = {lc.unroll_length}"
        )
    if lc.burn_in > lc.overlap:
        problems.append(
            f"learner.burn_in = {lc.burn_in} exceeds learner.overlap = {lc.overlap}: the steps in between "
            "would never be learned from; raise the overlap"
        )
    if cfg.env.normalize_obs:
        problems.append("env.normalize_obs does not fit r2d2 (its lstm_q takes raw observations): remove it")
    return problems
