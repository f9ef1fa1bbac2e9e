"""The run's metrics stream: its counters summed once per heartbeat, kept in Redis.

Place in the data flow: every role writes its counters to its stats hash (canopy/telemetry.py);
the learner holding the lease sums them here, once per `run.heartbeat_s`, into one entry of
the `metrics` stream (canopy/keys.py, XADD MAXLEN ~ `METRICS_MAXLEN`), which `canopy plot`
draws. Every launcher runs a learner, so the stream exists under compose, Kubernetes and Ray
as under `canopy up`. The writer also leaves the run's resolved config at `run:config`, so
operator tools handed only a Redis address know the env and the shard layout
(cluster/connection.py).
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from typing import Any

import redis
import tomli_w

from canopy.config import Config, to_dict
from canopy.keys import METRICS_MAXLEN, Keys

ACTOR_FIELDS = ("env_steps_total", "episodes_total", "episode_return_mean")
EVALUATOR_FIELDS = ("eval_return", "eval_version")


def sample(r: redis.Redis, keys: Keys, learner: dict[str, Any]) -> dict[str, str]:
    """One stream entry: the live actors' summed counters, the learner's (`learner`, its own
    counters) and the evaluator's newest score. Fields that are missing or not numbers in a
    stats hash (anyone with write access can put anything there) are left out of the sums."""
    actors = [int(m) for m in r.zrange(keys.alive("actor"), 0, -1) if m.isdigit() and len(m) < 10]
    pipe = r.pipeline(transaction=False)
    for ident in actors:
        pipe.hmget(keys.proc("actor", ident), *ACTOR_FIELDS)
    pipe.hmget(keys.proc("evaluator", 0), *EVALUATOR_FIELDS)
    *per_actor, (eval_return, eval_version) = pipe.execute()
    steps = episodes = 0
    returns = []
    for raw_steps, raw_episodes, raw_return in per_actor:
        steps += int(_number(raw_steps) or 0)
        n = int(_number(raw_episodes) or 0)
        episodes += n
        if n and _number(raw_return) is not None:
            returns.append(_number(raw_return))
    entry = {
        "t": f"{time.time():.3f}",
        "env_steps": str(steps),
        "episodes": str(episodes),
        "updates": str(int(learner.get("updates_total", 0))),
        "loss": f"{float(learner.get('loss', 0.0)):.6g}",
        "version": str(learner.get("policy_version", "")),
    }
    if returns:
        entry["train_return"] = f"{sum(returns) / len(returns):.6g}"
    if _number(eval_return) is not None:
        entry["eval_return"] = f"{_number(eval_return):.6g}"
        entry["eval_version"] = (eval_version or b"").decode(errors="replace")[:32]
    return entry


class MetricsWriter:
    """A daemon thread appending `sample` to the `metrics` stream every `period_s`.

    Example:
        writer = MetricsWriter(r, keys, cfg, tel.counters)
        writer.start()  # once this learner holds the lease
        writer.close()
    """

    def __init__(self, r: redis.Redis, keys: Keys, cfg: Config, counters: dict[str, Any]) -> None:
        self.r, self.keys, self.cfg, self.counters = r, keys, cfg, counters
        self.period_s = cfg.run.heartbeat_s
        self.errors = 0  # Redis errors: monitoring is best effort, training goes on
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics", daemon=True)

    def start(self) -> None:
        """Write the run's config to `run:config` (best effort), then sample every heartbeat."""
        with contextlib.suppress(redis.RedisError):
            self.r.set(self.keys.run_config, tomli_w.dumps(to_dict(self.cfg)))
        self._thread.start()

    def write(self) -> None:
        """Append one sample now."""
        try:
            entry = sample(self.r, self.keys, dict(self.counters))
            self.r.xadd(self.keys.metrics, entry, maxlen=METRICS_MAXLEN, approximate=True)
        except redis.RedisError:
            self.errors += 1

    def close(self) -> None:
        """Stop sampling; waits a few seconds for the thread."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.write()


def _number(raw: bytes | str | None) -> float | None:
    """A finite float from an untrusted field, else None."""
    try:
        value = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None
