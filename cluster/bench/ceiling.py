"""The throughput ceiling of a `canopy up`: its actors stepping their envs with random actions.

Place: measured by `canopy bench zoo` in its own process before any run, once per env, as
the baseline beside each canopy run's env steps/s. As many processes as the run has actors
(`actors.count` of the config the bench's runs get, an on-policy algorithm's defaults
included), each stepping a vector env of `actors.envs` copies with random actions
(canopy/envs.py `random_stepping_rate`, what `canopy bench actors` calls one actor's
ceiling), all at once: the sum is what the same actors would step with no policy, no
learner and no replay beside them on this machine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing as mp
import queue
import time
from typing import Any

from canopy.cluster.bench import harness

# Spawned, not forked: a worker gets a fresh interpreter, not the bench's threads and state.
CTX = mp.get_context("spawn")
START_TIMEOUT_S = 120.0  # a spawned worker imports gymnasium (and ale-py for Atari) first
ALGORITHM = "ppo"  # the algorithm whose actors (count, envs) the ceiling is measured for


def _step_randomly(env_id: str, envs: int, seconds: float, env_cfg: Any, start: Any, out: Any) -> None:
    """Worker: imports first, waits until every worker is ready, then steps for `seconds`."""
    from canopy.envs import make_vec, random_stepping_rate

    make_vec(env_id, 1, env_cfg).close()  # the env's own imports, before the clock starts
    start.wait(timeout=START_TIMEOUT_S)
    out.put(random_stepping_rate(env_id, envs, seconds, env_cfg))


def actors_of(env_id: str, sets: list[str]) -> tuple[int, int, Any]:
    """(actors.count, actors.envs, env config) a `canopy up --env ENV` with `sets` and the
    on-policy algorithm gets, its defaults filled in as the launcher fills them."""
    from canopy.config import load

    cfg = load(None, [*sets, f'learner.algorithm="{ALGORITHM}"'])
    return cfg.actors.count, cfg.actors.envs, dataclasses.replace(cfg.env, id=env_id)


def random_actions_rate(env_id: str, sets: list[str], seconds: float) -> dict[str, Any]:
    """Env steps/s of `actors.count` processes stepping `actors.envs` copies each with random
    actions, concurrently, summed: `env_steps_per_s`, with the processes, envs and seconds."""
    count, envs, env_cfg = actors_of(env_id, sets)
    start, out = CTX.Barrier(count), CTX.Queue()
    procs = [
        CTX.Process(target=_step_randomly, args=(env_id, envs, seconds, env_cfg, start, out), daemon=True)
        for _ in range(count)
    ]
    rates: list[float] = []
    deadline = time.monotonic() + START_TIMEOUT_S + seconds
    try:
        for p in procs:
            p.start()
        while len(rates) < count:
            # A worker that died (a bad env.kwargs, a missing extra) fails the measurement now,
            # not after the others have waited for it at the barrier until the deadline.
            failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if failed or time.monotonic() > deadline:
                raise RuntimeError(
                    f"{count - len(rates)} of {count} random-action workers of {env_id} did not "
                    f"report (exit codes {[p.exitcode for p in procs]})"
                )
            with contextlib.suppress(queue.Empty):
                rates.append(out.get(timeout=1.0))
    finally:
        harness.join(list(procs))
    return {
        "env_steps_per_s": round(sum(rates), 1),
        "processes": count,
        "envs_per_process": envs,
        "seconds": seconds,
        "per_process": [round(r, 1) for r in rates],
    }
