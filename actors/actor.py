"""`canopy actor --id N`: step a vector env, act and explore, stream n-step transitions
(or, for an on-policy learner, unrolls to the replay queue table).

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
from canopy.actors.unroll import UnrollAdder
from canopy.cache.client import leaf_client
from canopy.config import Config, on_policy
from canopy.config_defaults import UNROLLS
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
    r.set(keys.ledger_actor(ident), str(version))
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


def _adder(cfg: Config, pixels: bool, ident: int) -> FrameAdder | NStepAdder | UnrollAdder:
    """What cuts this actor's steps into replay items: unrolls for an on-policy learner,
    n-step transitions else (pixel frames sent once each)."""
    a, lc = cfg.actors, cfg.learner
    if on_policy(cfg):
        return UnrollAdder(a.envs, lc.unroll_length, AutoresetMode.NEXT_STEP)
    if pixels:
        return FrameAdder(a.envs, lc.n_step, lc.gamma, AutoresetMode.NEXT_STEP, ident)
    return NStepAdder(a.envs, lc.n_step, lc.gamma, AutoresetMode.NEXT_STEP)


def _act_and_add(env, adder, explorer: Explorer, policy, obs, version: int, clip: bool):
    """One vector step with this actor's policy: its next observations and the step's info."""
    if isinstance(adder, UnrollAdder):  # on-policy: actions from the policy's distribution
        actions, env_actions, logp = explorer.sample(policy, obs)
        next_obs, rewards, terminated, truncated, info = env.step(env_actions)
        rewards = np.sign(rewards) if clip else rewards
        adder.add(obs, actions, rewards, next_obs, terminated, truncated, info, logp, version)
        return next_obs, info
    actions, env_actions = explorer.act(policy, obs)
    return step_and_add(env, adder, obs, actions, env_actions, version, clip)


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
    adder = _adder(cfg, pixels, ident)
    # An on-policy actor sends whole unrolls, `actors.envs` to a chunk, and acts only with a
    # policy: random actions would be data no version of the learner's policy could take.
    unrolls = isinstance(adder, UnrollAdder)
    chunk_size = a.envs if unrolls else a.chunk
    # Only Q-value policies can price their own data (td3's actor has no critic), and
    # pixel chunks carry frame keys, not the stacks a forward pass needs.
    prioritized = cfg.replay.sampler == "prioritized" and explorer.discrete and not pixels and not unrolls
    # The shard follows replay membership in Redis (rendezvous hash of this actor's id).
    members = RedisMembers(r, keys, cfg.replay.member_ttl_s / 3, fallback=c.replay)
    max_frame = cfg.replay.max_frame_mb * 2**20
    table = UNROLLS if unrolls else None
    inserter = InsertClient(members, a.inflight_chunks, max_frame, table=table, key=ident)
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
            update = models.poll()
            if update is not None:
                version, policy = _swap_policy(update, ident, counters, r, keys)
            if paused or (unrolls and policy is None):
                stop.wait(PAUSE_POLL_S)
                continue

            obs, info = _act_and_add(env, adder, explorer, policy, obs, version.packed(), clip)

            _count_episodes(info, recent_returns, counters)
            counters["env_steps_total"] += a.envs
            chunk = adder.take(chunk_size)
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
