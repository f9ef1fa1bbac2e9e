"""`canopy evaluator --id N`: greedy evaluation of each newest policy version.

The judge of "solved": epsilon 0, `eval.episodes` episodes run side by side in one vector
env (each sub-env counts only its first episode), fresh seeds every time. Results go to
the stats hash (`eval_return`, `eval_version`) and, one entry per evaluation, to the
events stream (kind `eval`), which `canopy up` reads to decide when a run is solved.
A population version (`learner.models > 1`) has each model judged on the same seeds; the
best model's return is the version's (`eval_model`, `eval_model_returns` name them all).
"""

from __future__ import annotations

import threading
import time

import numpy as np

from actors.envs import make_vec
from actors.explore import Explorer
from actors.policy import limit_blas_threads, policy_from_arrays, population_arrays
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
            # Every model of a population on the same seeds; the best one is the version's score.
            per_model = [
                evaluate(env, policy_from_arrays(manifest.arch, model), seed)
                for model in population_arrays(arrays)
            ]
            best = int(np.argmax([r.mean() for r in per_model]))
            returns = per_model[best]
            mean = float(returns.mean())
            tel.counters.update(
                evals_total=tel.counters["evals_total"] + 1,
                eval_return=mean,
                eval_version=str(version),
                eval_seconds=round(time.monotonic() - last, 3),
            )
            extra = {}
            if len(per_model) > 1:
                extra = {"model": best, "model_returns": " ".join(f"{r.mean():.2f}" for r in per_model)}
                tel.counters.update(eval_model=best, eval_model_returns=extra["model_returns"])
            tel.event(
                "eval",
                version=str(version),
                mean_return=f"{mean:.2f}",
                episodes=len(returns),
                min_return=f"{returns.min():.2f}",
                **extra,
            )
    finally:
        models.stop()
        env.close()
        tel.event("stop")
        tel.close()
