"""`canopy actor --id N`: step a vector env, act and explore, stream n-step transitions.

build (env, clients) -> run (act, step, add, insert; swap weights when a version lands)
-> report (counters in the stats hash). Inserts block only when the replay shard's rate
limiter pushes back; a model download never blocks acting.
"""

from __future__ import annotations

import threading
from collections import deque

import numpy as np
from gymnasium.vector import AutoresetMode

from canopy.actors.adder import FrameAdder, NStepAdder
from canopy.actors.explore import Explorer, initial_priorities, ladder
from canopy.actors.policy import limit_blas_threads, member_arrays, policy_from_arrays
from canopy.cache.client import leaf_client
from canopy.config import Config
from canopy.envs import clips_rewards, make_vec, seed_base
from canopy.errors import ProtocolError
from canopy.keys import Keys
from canopy.redisconn import connect
from canopy.replay.client import InsertClient
from canopy.replay.membership import RedisMembers
from canopy.telemetry import Telemetry
from canopy.version import NO_VERSION

INSERT_TIMEOUT_S = 60.0
PAUSE_POLL_S = 0.1


def step_and_add(env, adder, obs, actions, env_actions, version: int, clip: bool) -> tuple[np.ndarray, dict]:
    """One vector step fed to the adder; returns the next observations and the step's info.

    With `clip` the adder gets sign(r) (Atari's reward clipping, `env.clip_rewards`); the
    env's RecordEpisodeStatistics has summed the true rewards already, so `info["episode"]`
    still reports true game scores.
    """
    next_obs, rewards, terminated, truncated, info = env.step(env_actions)
    if clip:
        rewards = np.sign(rewards)
    adder.add(obs, actions, rewards, next_obs, terminated, truncated, info, version)
    return next_obs, info


def _swap_policy(update, ident: int, counters: dict, r, keys: Keys):
    """The version that landed and its policy, recorded in the stats and the actor ledger."""
    version, manifest, arrays = update
    # Of a population version, the model this actor's id picks (learner/algorithms/population.py).
    counters["policy_model"], arrays = member_arrays(arrays, ident)
    policy = policy_from_arrays(manifest.arch, arrays)
    counters["policy_version"] = str(version)
    r.hset(keys.ledger_actors, str(ident), str(version))
    return version, policy


def _count_episodes(info: dict, recent_returns: deque[float], counters: dict) -> None:
    """Episodes that ended in this step: the count, and the mean of the recent true returns."""
    if "episode" in info:
        ended = info["_episode"]
        recent_returns.extend(info["episode"]["r"][ended].tolist())
        counters["episodes_total"] += int(ended.sum())
        if recent_returns:
            counters["episode_return_mean"] = float(np.mean(recent_returns))


def _insert(chunk, inserter, adder, obs, counters: dict, pixels: bool, stop, lost_seen: int) -> int:
    """Send a chunk to the replay shard; returns the shard moves + dropped chunks seen so far.

    Pixel chunks name frames sent before them: when the shard may lack some, the adder
    starts its frame chain again from `obs`.
    """
    try:
        inserter.insert(chunk, timeout=INSERT_TIMEOUT_S, stop=stop)
    except ProtocolError:
        if not pixels:
            raise
        adder.restart(obs)  # the shard lacks frames this chunk builds on
        counters["frame_chain_restarts_total"] += 1
    if pixels and inserter.moves_total + inserter.chunks_dropped_total != lost_seen:
        # A new shard, or chunks dropped on the way: frames it needs are gone.
        lost_seen = inserter.moves_total + inserter.chunks_dropped_total
        adder.restart(obs)
        counters["frame_chain_restarts_total"] += 1
    counters.update(
        insert_wait_seconds_total=inserter.wait_s_total,
        replay_shard=inserter.shard,
        replay_moves_total=inserter.moves_total,
        replay_chunks_dropped_total=inserter.chunks_dropped_total,
    )
    return lost_seen


def run(cfg: Config, ident: int, stop: threading.Event) -> None:
    """The actor process until `stop`: act, step, stream chunks; pause and resume on command."""
    a, c = cfg.actors, cfg.cluster
    keys = Keys(cfg.run.name)
    r = connect(c, "actor", ident)
    tel = Telemetry(r, keys, "actor", ident, cfg.run.heartbeat_s, commands=("pause", "resume"))
    tel.start()

    limit_blas_threads()
    env = make_vec(cfg.env.id, a.envs, cfg.env, asynchronous=a.async_envs)
    rng = np.random.default_rng([cfg.run.seed, ident])
    eps = ladder(ident, a.envs, a.count, a.eps_base, a.eps_alpha)
    explorer = Explorer(env.single_action_space, a.envs, rng, eps, a.action_noise)
    space = env.single_observation_space
    pixels = space.dtype == np.uint8 and len(space.shape) == 3  # stacked frames: send each once
    clip = clips_rewards(cfg.env)
    if pixels:
        adder = FrameAdder(a.envs, cfg.learner.n_step, cfg.learner.gamma, AutoresetMode.NEXT_STEP, ident)
    else:
        adder = NStepAdder(a.envs, cfg.learner.n_step, cfg.learner.gamma, AutoresetMode.NEXT_STEP)
    # Only Q-value policies can price their own data (td3's actor has no critic), and
    # pixel chunks carry frame keys, not the stacks a forward pass needs.
    prioritized = cfg.replay.sampler == "prioritized" and explorer.discrete and not pixels
    # The shard follows replay membership in Redis (rendezvous hash of this actor's id).
    members = RedisMembers(r, keys, cfg.replay.member_ttl_s / 3, fallback=c.replay)
    inserter = InsertClient(members, a.inflight_chunks, cfg.replay.max_frame_mb * 2**20, key=ident)
    models = leaf_client(c, cfg.cache, "actor", ident)

    policy = None
    lost_seen = 0
    version = NO_VERSION
    recent_returns: deque[float] = deque(maxlen=20)
    counters = tel.counters
    counters.update(
        env_steps_total=0,
        episodes_total=0,
        episode_return_mean=0.0,
        policy_version=str(version),
        frame_chain_restarts_total=0,
    )
    obs, _ = env.reset(seed=seed_base(cfg.run.seed, ident, a.envs))
    tel.set_state("running")
    tel.event("start", shard=inserter.shard, cache_node=models.fetch_endpoint)
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
                version, policy = _swap_policy(update, ident, counters, r, keys)

            actions, env_actions = explorer.act(policy, obs)
            obs, info = step_and_add(env, adder, obs, actions, env_actions, version.packed(), clip)

            _count_episodes(info, recent_returns, counters)
            counters["env_steps_total"] += a.envs
            chunk = adder.take(a.chunk)
            if chunk is not None:
                if prioritized and policy is not None:
                    chunk["priority"] = initial_priorities(policy, chunk)
                lost_seen = _insert(chunk, inserter, adder, obs, counters, pixels, stop, lost_seen)
    finally:
        models.stop()
        inserter.close()
        members.close()
        env.close()
        tel.event("stop")
        tel.close()
