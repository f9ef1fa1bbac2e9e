"""`canopy evaluator --id N`: greedy evaluation of each newest policy version.

The judge of "solved": epsilon 0, `eval.episodes` episodes run side by side in one vector
env (each sub-env counts only its first episode), fresh seeds every time. Results go to
the stats hash (`eval_return`, `eval_version`) and, one entry per evaluation, to the
events stream (kind `eval`), which `canopy up` reads to decide when a run is solved.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from actors.envs import make_vec
from actors.explore import Explorer
from actors.policy import limit_blas_threads, policy_from_arrays
from cache.client import leaf_client
from cluster.config import Config
from cluster.keys import Keys
from cluster.redisconn import connect
from cluster.telemetry import Telemetry

EVAL_SEED_OFFSET = 10**9  # evaluation seeds never overlap the actors' training seeds


def evaluate(env, policy, seed: int) -> np.ndarray:
    """Returns of the first episode of every sub-env, acting greedily."""
    n = env.num_envs
    explorer = Explorer(env.single_action_space, n, np.random.default_rng(seed))
    obs, _ = env.reset(seed=seed)
    returns = np.zeros(n)
    done = np.zeros(n, dtype=bool)
    while not done.all():
        obs, rewards, terminated, truncated, _ = env.step(explorer.greedy(policy, obs))
        returns += np.where(done, 0.0, rewards)
        done |= terminated | truncated
    return returns


def run(cfg: Config, ident: int, stop: threading.Event) -> None:
    c = cfg.cluster
    keys = Keys(cfg.run.name)
    r = connect(c, "evaluator", ident)
    tel = Telemetry(r, keys, "evaluator", ident, cfg.run.heartbeat_s)
    tel.start()
    limit_blas_threads()
    env = make_vec(cfg.env.id, cfg.eval.episodes, cfg.env)
    models = leaf_client(c, cfg.cache, "evaluator", ident)
    tel.counters.update(evals_total=0)
    tel.set_state("running")
    last = 0.0
    try:
        while not stop.is_set():
            update = models.wait(timeout=0.5)
            if update is None:
                continue
            version, manifest, arrays = update
            stop.wait(max(0.0, last + cfg.eval.min_interval_s - time.monotonic()))
            last = time.monotonic()
            seed = EVAL_SEED_OFFSET + cfg.run.seed * 10**6 + tel.counters["evals_total"] * env.num_envs
            returns = evaluate(env, policy_from_arrays(manifest.arch, arrays), seed)
            mean = float(returns.mean())
            tel.counters.update(
                evals_total=tel.counters["evals_total"] + 1,
                eval_return=mean,
                eval_version=str(version),
                eval_seconds=round(time.monotonic() - last, 3),
            )
            tel.event(
                "eval",
                version=str(version),
                mean_return=f"{mean:.2f}",
                episodes=len(returns),
                min_return=f"{returns.min():.2f}",
            )
    finally:
        models.stop()
        env.close()
        tel.event("stop")
        tel.close()
