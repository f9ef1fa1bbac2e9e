"""`canopy evaluator --id N`: the judge of every policy version, and keeper of the best one.

Place in the data flow: versions arrive from the cache tree like an actor's; verdicts go
to the events stream, which `canopy up` reads to decide when a run is solved, and the best
confirmed version is pinned in Redis (`eval:best`, cache/blob.py `pin`), which is what
`canopy eval` and `canopy export` hand over.

Two stages, both greedy (epsilon 0), every episode on a fresh seed, each stage one vector
env whose sub-envs count only their first episode:
- screen: each newest version over `eval.episodes` episodes (event `eval`, stats
  `eval_return`); cheap, and noisy on purpose;
- confirm: a version that screens above the best confirmed score (or the first one) is
  judged again over `eval.confirm_episodes` episodes (event `confirm`). Only confirmed
  scores count: "solved" is a confirmed mean at or above the threshold, and a confirmed
  mean above the best one's replaces the pinned best version. A run that keeps training
  therefore never hands over a worse model than one it already showed.
A population version (`learner.models > 1`) has each model screened on the same seeds;
the best model is the one confirmed and pinned (`model` in the record).
"""

from __future__ import annotations

import threading
import time

import numpy as np

from canopy.actors.explore import Explorer
from canopy.actors.policy import limit_blas_threads, policy_from_arrays, population_arrays
from canopy.cache import blob
from canopy.cache.client import leaf_client
from canopy.config import Config, EnvConfig
from canopy.envs import make_vec
from canopy.keys import Keys
from canopy.redisconn import connect
from canopy.telemetry import Telemetry

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
        explorer.stepped(terminated, truncated)  # a recurrent policy's state restarts per episode
        returns += np.where(done, 0.0, rewards)
        done |= terminated | truncated
    return returns


def judge(arch: str, arrays: dict[str, np.ndarray], env_cfg: EnvConfig, episodes: int, seed: int) -> dict:
    """A policy's greedy score over `episodes` episodes on seeds seed, seed+1, ... (one vector env)."""
    env = make_vec(env_cfg.id, episodes, env_cfg)
    try:
        return summarize(evaluate(env, policy_from_arrays(arch, arrays), seed))
    finally:
        env.close()


def earns_confirmation(screen_mean: float, best_mean: float | None) -> bool:
    """Whether a screened version may beat the best confirmed one, and so is judged in full."""
    return best_mean is None or screen_mean > best_mean


def improves(confirmed_mean: float, best_mean: float | None) -> bool:
    """Whether a confirmed score replaces the pinned best (ties keep the older version)."""
    return best_mean is None or confirmed_mean > best_mean


def summarize(returns: np.ndarray) -> dict[str, float | int]:
    """The figures every verdict reports, rounded for events and records."""
    return {
        "mean": round(float(returns.mean()), 3),
        "std": round(float(returns.std()), 3),
        "min": round(float(returns.min()), 3),
        "max": round(float(returns.max()), 3),
        "episodes": len(returns),
    }


def _screen(tel: Telemetry, env, policies: list, seed: int, version, started: float) -> tuple[int, dict]:
    """Every model on the same seeds: the best one and its figures, reported as event `eval`."""
    per_model = [evaluate(env, policy, seed) for policy in policies]
    model = int(np.argmax([x.mean() for x in per_model]))
    screen = summarize(per_model[model])
    tel.counters.update(
        evals_total=tel.counters["evals_total"] + 1,
        eval_return=screen["mean"],
        eval_version=str(version),
        eval_seconds=round(time.monotonic() - started, 3),
    )
    extra = {}
    if len(per_model) > 1:
        extra = {"model": model, "model_returns": " ".join(f"{x.mean():.2f}" for x in per_model)}
        tel.counters.update(eval_model=model, eval_model_returns=extra["model_returns"])
    tel.event(
        "eval",
        version=str(version),
        mean_return=f"{screen['mean']:.2f}",
        episodes=screen["episodes"],
        min_return=f"{screen['min']:.2f}",
        **extra,
    )
    return model, screen


def _confirm(
    r, keys: Keys, tel: Telemetry, env, next_seed, update, policy, model: int, best_mean: float | None
) -> float | None:
    """Judge a screened model in full, pin it if it beats the best (event `confirm`); the new best mean."""
    version, manifest, arrays = update
    t_confirm = time.monotonic()
    verdict = summarize(evaluate(env, policy, next_seed(env.num_envs)))
    is_best = improves(verdict["mean"], best_mean)
    if is_best:
        best_mean = verdict["mean"]
        record = {**verdict, "model": model, "confirmed_at": round(time.time(), 3)}
        # Pinned before the event: whoever reads `confirm ... best=1` finds it in Redis.
        blob.pin(r, keys, arrays, manifest, record)
        tel.counters.update(best_version=str(version), best_return=best_mean)
    tel.counters.update(
        confirms_total=tel.counters["confirms_total"] + 1,
        confirm_seconds=round(time.monotonic() - t_confirm, 3),
    )
    tel.event(
        "confirm",
        version=str(version),
        model=model,
        mean_return=f"{verdict['mean']:.2f}",
        std_return=f"{verdict['std']:.2f}",
        min_return=f"{verdict['min']:.2f}",
        episodes=verdict["episodes"],
        best=int(is_best),
    )
    return best_mean


def run(cfg: Config, ident: int, stop: threading.Event) -> None:
    """The evaluator process until `stop`: screen each new version, confirm and pin the best."""
    c = cfg.cluster
    keys = Keys(cfg.run.name)
    r = connect(c, "evaluator", ident)
    tel = Telemetry(r, keys, "evaluator", ident, cfg.run.heartbeat_s)
    tel.start()
    limit_blas_threads()
    screen_env = make_vec(cfg.env.id, cfg.eval.episodes, cfg.env)
    confirm_env = make_vec(cfg.env.id, cfg.eval.confirm_episodes, cfg.env)
    models = leaf_client(c, cfg.cache, "evaluator", ident)
    # A restarted evaluator (or a resumed run) goes on from the best it confirmed before.
    best = {k.decode(): v.decode() for k, v in r.hgetall(keys.best).items()}
    best_mean = float(best["mean"]) if "mean" in best else None
    episodes_used = 0  # every episode takes the next fresh seed

    def next_seed(n: int) -> int:
        nonlocal episodes_used
        seed = EVAL_SEED_OFFSET + cfg.run.seed * 10**7 + episodes_used
        episodes_used += n
        return seed

    tel.counters.update(evals_total=0, confirms_total=0, best_version=best.get("version", ""))
    if best_mean is not None:
        tel.counters["best_return"] = best_mean
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
            # Every model of a population on the same seeds; the best one is the version's score.
            members = population_arrays(arrays)
            policies = [policy_from_arrays(manifest.arch, model) for model in members]
            model, screen = _screen(tel, screen_env, policies, next_seed(screen_env.num_envs), version, last)
            if not earns_confirmation(screen["mean"], best_mean):
                continue
            best_mean = _confirm(
                r, keys, tel, confirm_env, next_seed, update, policies[model], model, best_mean
            )
    finally:
        models.stop()
        screen_env.close()
        confirm_env.close()
        tel.event("stop")
        tel.close()
