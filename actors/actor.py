"""`canopy actor --id N`: step a vector env, act epsilon-greedily, stream n-step transitions.

build (env, clients) -> run (act, step, add, insert; swap weights when a version lands)
-> report (counters in the stats hash). Inserts block only when the replay shard's rate
limiter pushes back; a model download never blocks acting.
"""

from __future__ import annotations

import threading
from collections import deque

import numpy as np
from gymnasium.vector import AutoresetMode

from actors.adder import NStepAdder
from actors.envs import make_vec, seed_base
from actors.policy import MLPPolicy, epsilon_ladder
from cache.client import leaf_client
from cluster.config import Config
from cluster.keys import Keys
from cluster.redisconn import connect
from cluster.telemetry import Telemetry
from cluster.version import NO_VERSION
from replay.client import InsertClient, shard_for

INSERT_TIMEOUT_S = 60.0
PAUSE_POLL_S = 0.1


def run(cfg: Config, ident: int, stop: threading.Event) -> None:
    a, c = cfg.actors, cfg.cluster
    keys = Keys(cfg.run.name)
    r = connect(c, "actor", ident)
    tel = Telemetry(r, keys, "actor", ident, cfg.run.heartbeat_s, commands=("pause", "resume"))
    tel.start()

    env = make_vec(cfg.env.id, a.envs)
    n_actions = int(env.single_action_space.n)
    slots = a.count * a.envs
    eps = np.array(
        [epsilon_ladder(ident * a.envs + j, slots, a.eps_base, a.eps_alpha) for j in range(a.envs)]
    )
    rng = np.random.default_rng([cfg.run.seed, ident])
    adder = NStepAdder(a.envs, cfg.learner.n_step, cfg.learner.gamma, AutoresetMode.NEXT_STEP)
    inserter = InsertClient(
        c.replay[shard_for(ident, len(c.replay))],
        a.inflight_chunks,
        cfg.replay.max_frame_mb * 2**20,
    )
    models = leaf_client(c, cfg.cache, "actor", ident)

    policy: MLPPolicy | None = None
    version = NO_VERSION
    recent_returns: deque[float] = deque(maxlen=20)
    counters = tel.counters
    counters.update(env_steps_total=0, episodes_total=0, episode_return_mean=0.0, policy_version=str(version))
    obs, _ = env.reset(seed=seed_base(cfg.run.seed, ident, a.envs))
    tel.set_state("running")
    tel.event("start", shard=shard_for(ident, len(c.replay)), cache_node=models.fetch_endpoint)
    try:
        paused = False
        while not stop.is_set():
            while not tel.commands.empty():  # operator: RPUSH control:actor:<id> pause|resume
                paused = tel.commands.get() == "pause"
                tel.set_state("paused" if paused else "running")
            if paused:
                stop.wait(PAUSE_POLL_S)
                continue
            update = models.poll()
            if update is not None:
                version, manifest, arrays = update
                policy = MLPPolicy.from_arrays(manifest.arch, arrays)
                counters["policy_version"] = str(version)
                r.hset(keys.ledger_actors, str(ident), str(version))

            actions = rng.integers(n_actions, size=a.envs)
            if policy is not None:
                greedy = policy.q_values(obs).argmax(axis=1)
                actions = np.where(rng.random(a.envs) < eps, actions, greedy)
            next_obs, rewards, terminated, truncated, info = env.step(actions)
            adder.add(obs, actions, rewards, next_obs, terminated, truncated, info, version.packed())
            obs = next_obs

            if "episode" in info:
                ended = info["_episode"]
                recent_returns.extend(info["episode"]["r"][ended].tolist())
                counters["episodes_total"] += int(ended.sum())
                if recent_returns:
                    counters["episode_return_mean"] = float(np.mean(recent_returns))
            counters["env_steps_total"] += a.envs
            chunk = adder.take(a.chunk)
            if chunk is not None:
                inserter.insert(chunk, timeout=INSERT_TIMEOUT_S, stop=stop)
                counters["insert_wait_seconds_total"] = inserter.wait_s_total
    finally:
        models.stop()
        inserter.close()
        env.close()
        tel.event("stop")
        tel.close()
