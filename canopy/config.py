"""One typed config tree for every role, loaded from TOML with `--set a.b=value` overrides.

The same tree describes a local `canopy up` run and a cluster spread over hosts: the
`[cluster]` section holds the addresses (filled in by `canopy up`, written by operators
elsewhere). Each role receives only its own section plus `cluster` and `run`.
`verify` reports every problem at once, each on one line naming the key and what is allowed;
canopy/config_checks.py merges the overrides and checks every value's type.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from canopy.config_checks import apply_overrides, build
from canopy.config_defaults import ON_POLICY, UNROLLS, algorithm_defaults
from canopy.errors import ConfigError


@dataclass
class RunConfig:
    """The run as a whole: its name, directory, seed and when it stops."""

    name: str = ""  # run id used in Redis key names; `canopy up` makes one when empty
    dir: str = ""  # run directory; `canopy up` uses runs/<name> when empty
    seed: int = 0  # every role derives its RNG and env seeds from it and its id
    stop_at_return: float = math.inf  # stop once a greedy evaluation reaches this mean return
    time_limit_s: float = 0.0  # 0: no limit
    heartbeat_s: float = 2.0  # stats refresh period; keys expire after 3 periods


@dataclass
class EnvConfig:
    """The gymnasium environment every actor and the evaluator build, and its preprocessing."""

    # A registered gymnasium id, or module:id to import the module that registers it first
    # (my_pkg.envs:MyEnv-v0; the module must be importable wherever canopy roles run).
    id: str = "CartPole-v1"
    # Keyword arguments of the env's constructor, for every role that builds it: a TOML
    # table, e.g. --set 'env.kwargs={g = 9.81}' or --set env.kwargs.g=9.81.
    kwargs: dict[str, Any] = field(default_factory=dict)
    # Atari only: rewards stored in replay are sign(r); returns reported stay true game scores.
    clip_rewards: bool = True
    # Learner-side running mean/std of observations (learner/obsnorm.py), folded into the
    # published MLP so actors keep acting on raw observations. Flat observations only.
    normalize_obs: bool = False
    # Atari (ALE/... ids, with ale-py installed): the standard preprocessing of
    # canopy/envs.py. Frames are grey 84x84, max-pooled over the last two of each skip.
    frame_skip: int = 4
    frame_stack: int = 4  # frames per observation
    sticky_actions: float = 0.25  # repeat_action_probability (Machado et al. 2018)
    noop_max: int = 30  # random no-ops at reset


@dataclass
class RedisConfig:
    """The Redis shards `canopy up` starts: shard 0 is the model root and holds monitoring keys."""

    shards: int = 2  # redis-server processes; shard 0 is the root
    maxmemory_mb: int = 2048  # per shard; the append-only file is rewritten only past twice this
    # Append-only file in RUN_DIR/redis-<i>, fsynced every second (cluster/redis_server.py):
    # a crashed shard or a stopped run comes back with its data (`canopy up --resume`).
    persist: bool = True


@dataclass
class ReplayConfig:
    """Replay shards: tables, sampling, the rate limiter, snapshots and membership."""

    shards: int = 1  # replay shard processes
    # Long memory: a policy that already balances keeps seeing the failures it no longer makes
    # (100k items, 10 s of CartPole, let it forget them and collapse). capacity_mb bounds pixels.
    capacity: int = 1_000_000
    min_size: int = 2_000  # no sampling before this many items
    # Rate limiter target; 0 disables it. 32 (with learner.tau 0.01) gave the steadiest and
    # fastest CartPole solves of the settings tried (docs/benchmarks.md): on a small machine
    # the learner's updates, not env steps, are what runs out.
    samples_per_insert: float = 32.0
    error_buffer: float = 40_000.0  # slack of the limiter, in sampled items; see replay/limiter.py
    max_frame_mb: int = 64  # largest message frame a shard or its clients accept
    max_pending: int = 256  # requests parked by the rate limiter, per shard
    sample_wait_s: float = 2.0  # a parked sample request is answered `not_ready` after this
    # Tables (replay/table.py, replay/selectors.py): uniform | prioritized | fifo | lifo |
    # min_heap | max_heap for sampling; uniform | fifo | lifo | min_heap | max_heap for removal.
    sampler: str = "uniform"
    remover: str = "fifo"  # which item leaves a full table
    max_times_sampled: int = 0  # 0: unlimited; 1 with fifo/fifo makes a queue
    extra_tables: list[str] = field(default_factory=list)  # "name:sampler:remover[:mts[:capacity]]"
    capacity_mb: int = 2048  # byte bound per shard on top of `capacity` (0: items only)
    priority_exponent: float = 0.6  # alpha: P(i) ~ p_i ** alpha
    importance_exponent: float = 0.4  # beta at the start, annealed linearly ...
    importance_exponent_final: float = 1.0  # ... to this ...
    importance_anneal_updates: int = 100_000  # ... over this many learner batches
    # Snapshots (replay/snapshot.py): a shard writes its tables under
    # <snapshot_dir>/shard-<id>/ this often and restores the newest one at start.
    snapshot_dir: str = ""  # empty: no snapshots; `canopy up` uses RUN_DIR/replay
    snapshot_interval_s: float = 60.0  # seconds between two snapshots
    # Pixel tables (replay/frames.py): inserts carrying `frame` columns store each frame once
    # and rebuild stacks of `frame_stack` frames at sample time; a frame may be referenced by
    # later inserts until `frame_window` newer frames have reached the shard.
    frame_stack: int = 4
    frame_window: int = 65_536  # newest frames kept pinned so later inserts may name them
    # Membership (replay/membership.py): a shard refreshes its deadline every third of this;
    # clients rehash when a shard has missed it (killed) or left.
    member_ttl_s: float = 3.0


@dataclass
class CacheConfig:
    """Cache nodes: the tree that carries each policy version from Redis to the actors."""

    nodes: int = 1  # cache node processes
    keep_versions: int = 4  # newest versions each node keeps
    poll_s: float = 1.0  # re-read `model:latest` this often in case a notification was missed
    heartbeat_s: float = 0.25  # notify re-sent (and child heartbeats sent) this often
    parent_timeout_s: float = 1.0  # a parent silent this long is replaced by the next candidate
    request_timeout_s: float = 5.0  # a fetch unanswered this long is retried on a fresh socket
    codec: str = "raw"  # raw | bf16 | int8delta (cache/codecs.py)
    codec_levels: int = 256  # K of int8delta
    keyframe_every: int = 16  # int8delta: one raw keyframe per this many versions
    shm: bool = True  # leaf nodes hand weights to same-host actors through shared memory
    shm_slots: int = 3  # versions in the host's shared-memory ring
    fanout: int = 0  # children per node; 0 = chosen by the topology planner


@dataclass
class LearnerConfig:
    """The learner: network, algorithm, optimizer, publishing and learner groups."""

    device: str = "auto"  # auto | cpu | cuda
    bf16: bool = False  # CUDA: forward and backward passes under bfloat16 autocast
    compile: bool = False  # torch.compile the networks (worth it for long runs on GPU)
    hidden: list[int] = field(default_factory=lambda: [128, 128])  # widths of the hidden layers
    dueling: bool = False  # value + advantage heads (learner/network.py); actors see a plain mlp
    # dqn mlp: layer normalization after every hidden layer. What keeps CartPole's newest
    # version at 500 through 300 s of training; without it DQN collapses (docs/algorithms.md).
    layer_norm: bool = True
    # dqn: Discrete actions (learner/algorithms/dqn.py); td3, sac: Box actions (algorithms/td3.py,
    # sac.py); ppo, impala: on-policy, either action space (algorithms/ppo.py, impala.py), with their
    # own defaults (ALGORITHM_DEFAULTS); auto: dqn or td3, whichever fits the action space.
    algorithm: str = "auto"
    # Polyak rate of the target networks: every target update moves them this far toward the
    # online ones (td3: every policy update; sac: every update; dqn: every target_update_period
    # updates; 1: a copy). 0.01 over 0.005: CartPole's DQN solved sooner on every seed tried,
    # Pendulum's TD3 no later.
    tau: float = 0.01
    policy_delay: int = 2  # td3: critic updates per actor update
    target_noise: float = 0.2  # td3: std of the target policy smoothing noise (actions in [-1, 1])
    noise_clip: float = 0.5  # td3: ... clipped to this
    batch_size: int = 64  # with samples_per_insert 32: one update every two env steps
    lr: float = 1e-3  # Adam's step size (td3: actor and critics alike; sac: also the entropy weight)
    lr_anneal_updates: int = 30_000  # dqn: anneal lr linearly to lr_final over this many updates (0: off)
    lr_final: float = 5e-5  # dqn: the step size once the anneal is over
    adam_eps: float = 1e-8  # dqn: Adam's epsilon
    gamma: float = 0.99  # discount per env step, in (0, 1]
    n_step: int = 3  # env steps summed into each transition's return (on the actor)
    target_update_period: int = 1  # dqn: updates between target-network updates (see tau)
    max_grad_norm: float = 10.0  # gradients are clipped to this global norm
    publish_every: int = 50  # updates between published policy versions
    keep_versions: int = 8  # published versions kept in Redis
    samples_in_flight: int = 4  # sample requests outstanding per replay shard
    threads: int = 1  # torch intra-op threads on CPU
    # Data-parallel ranks training one model together (learner/group.py): each samples its
    # own batches, gradients are averaged before every step; only rank 0 publishes.
    learners: int = 1
    # On-policy learners (ppo, impala) read unrolls of `unroll_length` env steps from the
    # replay queue table UNROLLS; `batch_size` then counts unrolls.
    unroll_length: int = 32
    epochs: int = 10  # ppo: passes over each batch, in minibatches
    minibatch_size: int = 256  # ppo: env steps per gradient step
    gae_lambda: float = 0.95  # ppo: lambda of GAE
    clip_range: float = 0.2  # ppo: the surrogate's ratio clip, annealed like lr ...
    clip_range_final: float = 0.2  # ... to this over lr_anneal_updates
    value_clip: float = 0.0  # ppo: clip value updates to this far from the old values (0: off)
    vf_coef: float = 0.5  # ppo, impala: weight of the value loss
    ent_coef: float = 0.0  # ppo, impala: weight of the entropy bonus
    rho_bar: float = 1.0  # impala: V-trace's clip of the importance weight in the TD error
    c_bar: float = 1.0  # impala: V-trace's clip of the trace (how far corrections reach back)
    # A population trained together (learner/algorithms/population.py): each model its own network,
    # optimizer and batches from the shared replay; one version holds them all; actor i
    # acts with model i % models. In a group their all-reduces overlap (learner/overlap.py).
    models: int = 1
    model_lr: list[float] = field(default_factory=list)  # one learning rate per model; empty: lr


@dataclass
class ActorConfig:
    """Actors: vector envs, insert chunks and exploration."""

    count: int = 2  # actor processes
    envs: int = 8  # copies in each actor's vector env
    async_envs: bool = False  # one subprocess per copy: for slow envs (Atari, MuJoCo), not CartPole
    chunk: int = 64  # transitions per insert message
    inflight_chunks: int = 4  # unacknowledged inserts before the actor waits (backpressure)
    eps_base: float = 0.4  # Ape-X ladder: slot i of N acts with eps_base ** (1 + alpha * i / (N-1))
    eps_alpha: float = 7.0  # alpha of that ladder
    action_noise: float = 0.1  # Box actions: std of the Gaussian exploration noise, actions in [-1, 1]


@dataclass
class EvalConfig:
    """The evaluator: how versions are screened and confirmed."""

    # Every new version is screened over `episodes` fresh greedy episodes; one that screens
    # above the best confirmed score is confirmed over `confirm_episodes` more (the gymnasium
    # and rl-zoo convention is 100). Only confirmed scores count as solved or as the best.
    episodes: int = 10
    confirm_episodes: int = 100  # more episodes for a version that screened above the best
    min_interval_s: float = 0.0  # least time between two screenings


@dataclass
class CheckpointConfig:
    """Learner checkpoints in replicated Redis shards, the lease, and restarts."""

    enabled: bool = True  # the active learner takes checkpoints
    every_s: float = 15.0  # seconds between checkpoints (0: only on demand)
    replicas: int = 2  # copies of every chunk, each on a shard of a distinct host
    keep: int = 3  # committed checkpoints kept; older ones are deleted
    chunk_mb: int = 1  # chunk size, 1-4 MiB (Redis is fastest around 1 MiB values)
    rate_mb_s: float = 400.0  # writer bandwidth cap so replay sampling is not starved; 0: none
    placement: str = "auto"  # auto | group | ring (see learner/checkpoint/placement.py)
    shard_hosts: list[str] = field(default_factory=list)  # host label per Redis shard; empty: one each
    learner_host: str = ""  # host label of the learner, never the only holder of a chunk
    lease_ttl_s: float = 1.0  # the active learner's lease; a standby takes over when it expires
    standby: bool = True  # `canopy up` runs a warm standby learner
    restart_backoff_s: float = 1.0  # `canopy up` restarts a dead role after this, doubling to 30 s
    # The writer checks the shards this often between checkpoints and re-replicates when one
    # died or came back empty, so R copies return even when no checkpoint is being written.
    repair_every_s: float = 5.0


@dataclass
class ClusterConfig:
    """Addresses and secrets of every listening role (filled in by `canopy up`)."""

    host: str = "127.0.0.1"  # where `canopy up` puts every role
    # Bind every listening socket on all interfaces (containers, several hosts): clients keep
    # connecting to the addresses listed below, which may then be DNS names.
    bind_all: bool = False
    redis: list[str] = field(default_factory=list)  # "host:port" per Redis shard; shard 0 is root
    redis_user: str = "canopy"  # the operator's Redis user
    password_file: str = ""  # that user's password; role passwords lie beside it
    replay: list[str] = field(default_factory=list)  # ZeroMQ endpoint per replay shard
    cache_fetch: list[str] = field(default_factory=list)  # ROUTER endpoint per cache node
    cache_notify: list[str] = field(default_factory=list)  # PUB endpoint per cache node
    curve_dir: str = ""  # CURVE keys from `canopy keys DIR` (canopy/curve.py); empty: plain tcp
    # Least-privilege Redis users, one per role (canopy/acl.py), each with its password in
    # redis.<role>.password beside password_file; off: every role connects as redis_user.
    role_users: bool = False
    actor_users: bool = False  # and each actor its own, `actor-<id>`, that may write only its own keys
    tls: bool = False  # Redis over TLS only; clients check shards against tls/ca.crt beside password_file
    # host:port of the learner group's rendezvous (TCPStore), served by rank 0; needed when
    # learner.learners > 1 (`canopy up` picks a free port).
    learner_store: str = ""


@dataclass
class Config:
    """The whole tree: one section per role or concern (`cfg.learner.lr`)."""

    run: RunConfig = field(default_factory=RunConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    actors: ActorConfig = field(default_factory=ActorConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


# Lower bounds checked by `verify`; every other number only has to have the right type.
_MINIMUMS: dict[str, float] = {
    "run.heartbeat_s": 0.1,
    "env.frame_skip": 1,
    "env.frame_stack": 1,
    "env.sticky_actions": 0,
    "env.noop_max": 0,
    "redis.shards": 1,
    "redis.maxmemory_mb": 16,
    "replay.shards": 1,
    "replay.capacity": 1,
    "replay.min_size": 1,
    "replay.samples_per_insert": 0,
    "replay.error_buffer": 0,
    "replay.max_frame_mb": 1,
    "replay.max_pending": 1,
    "replay.sample_wait_s": 0.01,
    "replay.max_times_sampled": 0,
    "replay.capacity_mb": 0,
    "replay.priority_exponent": 0,
    "replay.importance_exponent": 0,
    "replay.importance_exponent_final": 0,
    "replay.importance_anneal_updates": 1,
    "replay.snapshot_interval_s": 1.0,
    "replay.frame_stack": 1,
    "replay.frame_window": 16,
    "replay.member_ttl_s": 0.3,
    "cache.nodes": 1,
    "cache.keep_versions": 1,
    "cache.poll_s": 0.05,
    "cache.fanout": 0,
    "learner.batch_size": 1,
    "learner.tau": 0,
    "learner.policy_delay": 1,
    "learner.target_noise": 0,
    "learner.noise_clip": 0,
    "actors.action_noise": 0,
    "learner.lr": 0,
    "learner.lr_anneal_updates": 0,
    "learner.lr_final": 0,
    "learner.adam_eps": 0,
    "learner.n_step": 1,
    "learner.target_update_period": 1,
    "learner.publish_every": 1,
    "learner.keep_versions": 2,
    "learner.samples_in_flight": 1,
    "learner.threads": 1,
    "learner.learners": 1,
    "learner.models": 1,
    "learner.unroll_length": 1,
    "learner.epochs": 1,
    "learner.minibatch_size": 1,
    "learner.gae_lambda": 0,
    "learner.clip_range": 0,
    "learner.clip_range_final": 0,
    "learner.value_clip": 0,
    "learner.vf_coef": 0,
    "learner.ent_coef": 0,
    "learner.rho_bar": 0,
    "learner.c_bar": 0,
    "actors.count": 1,
    "actors.envs": 1,
    "actors.chunk": 1,
    "actors.inflight_chunks": 1,
    "eval.episodes": 1,
    "eval.confirm_episodes": 1,
    "checkpoint.every_s": 0,
    "checkpoint.replicas": 1,
    "checkpoint.keep": 1,
    "checkpoint.chunk_mb": 1,
    "checkpoint.rate_mb_s": 0,
    "checkpoint.lease_ttl_s": 0.2,
    "checkpoint.restart_backoff_s": 0,
    "checkpoint.repair_every_s": 0.1,
}
_CHOICES: dict[str, tuple[str, ...]] = {
    "learner.device": ("auto", "cpu", "cuda"),
    "learner.algorithm": ("auto", "dqn", "td3", "sac", "ppo", "impala"),
    "checkpoint.placement": ("auto", "group", "ring"),
    "replay.sampler": ("uniform", "prioritized", "fifo", "lifo", "min_heap", "max_heap"),
    "replay.remover": ("uniform", "fifo", "lifo", "min_heap", "max_heap"),
    "cache.codec": ("raw", "bf16", "int8delta"),
}


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Build the config from defaults, then a TOML file, then `key=value` overrides.

    Raises ConfigError listing every unknown key and bad value.

    Example:
        cfg = load("cluster.toml", ["learner.lr=5e-4", "actors.count=4"])
    """
    text = ""
    if path is not None:
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            raise ConfigError([f"config file {path} not found"]) from None
    return loads(text, overrides, f"config file {path}")


def loads(text: str, overrides: list[str] | None = None, source: str = "config") -> Config:
    """`load` from TOML text (a run's `run:config` in Redis); `source` names it in errors."""
    problems: list[str] = []
    try:
        data: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{source} is not valid TOML: {exc}"]) from None
    apply_overrides(data, overrides or [], problems)
    algorithm_defaults(data)
    cfg = build(Config, data, "", problems)
    problems += verify(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def verify(cfg: Config) -> list[str]:
    """Return one line per value out of range (empty when the config is usable)."""
    problems = []
    for key, low in _MINIMUMS.items():
        value = get(cfg, key)
        if value < low:
            problems.append(f"{key} = {value} is too small: must be >= {low}")
    for key, allowed in _CHOICES.items():
        if get(cfg, key) not in allowed:
            problems.append(f"{key} = {get(cfg, key)!r} is not one of {', '.join(allowed)}")
    if not cfg.learner.hidden or any(h < 1 for h in cfg.learner.hidden):
        problems.append("learner.hidden must be a non-empty list of positive layer widths")
    if not 0 < cfg.learner.gamma <= 1:
        problems.append(f"learner.gamma = {cfg.learner.gamma} must be in (0, 1]")
    if not 0 <= cfg.actors.eps_base <= 1:
        problems.append(f"actors.eps_base = {cfg.actors.eps_base} must be in [0, 1]")
    lc = cfg.learner
    if lc.model_lr and len(lc.model_lr) != lc.models:
        problems.append(f"learner.model_lr has {len(lc.model_lr)} rates for learner.models = {lc.models}")
    if any(lr <= 0 for lr in lc.model_lr):
        problems.append("learner.model_lr rates must be positive")
    if lc.models > 1 and lc.algorithm not in ("auto", "dqn"):
        problems.append('learner.models > 1 trains dqn populations only: set learner.algorithm = "dqn"')
    problems += _on_policy_problems(cfg)
    store = cfg.cluster.learner_store
    if store and not (store.rpartition(":")[0] and store.rpartition(":")[2].isdigit()):
        problems.append(f"cluster.learner_store = {store!r} must be host:port")
    if cfg.replay.min_size > cfg.replay.capacity:
        problems.append("replay.min_size must not exceed replay.capacity")
    problems += _verify_env(cfg.env)
    return problems


def on_policy(cfg: Config) -> bool:
    """Whether the learner trains on unrolls from the UNROLLS queue (ppo, impala)."""
    return cfg.learner.algorithm in ON_POLICY


def _on_policy_problems(cfg: Config) -> list[str]:
    """One line per setting an on-policy learner cannot work with (none for dqn, td3, sac)."""
    if not on_policy(cfg):
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


# Set by canopy itself when it builds an env, so not allowed in env.kwargs.
_RESERVED_KWARGS = {
    "render_mode": "canopy eval --video sets it",
    "num_envs": "set actors.envs",
    "vectorization_mode": "set actors.async_envs",
    "vector_kwargs": "canopy sets the autoreset mode",
    "wrappers": "canopy wraps the env itself",
}
_ATARI_KWARGS = {"frameskip": "set env.frame_skip", "repeat_action_probability": "set env.sticky_actions"}


def _verify_env(env: EnvConfig) -> list[str]:
    problems = []
    atari = env.id.rpartition(":")[2].startswith("ALE/")  # canopy/envs.py is_atari, without its imports
    reserved = {**_RESERVED_KWARGS, **(_ATARI_KWARGS if atari else {})}
    for key in env.kwargs:
        if not isinstance(key, str):
            problems.append(f"env.kwargs key {key!r} must be a string")
        elif key in reserved:
            problems.append(f"env.kwargs.{key} is set by canopy: {reserved[key]}")
    if env.normalize_obs and atari:
        problems.append("env.normalize_obs needs flat observations; Atari frames are pixels: set it to false")
    return problems


def get(cfg: Config, key: str) -> Any:
    """The value of a dotted key such as `learner.lr`."""
    section, _, name = key.partition(".")
    return getattr(getattr(cfg, section), name)


def to_dict(cfg: Config) -> dict[str, Any]:
    """The tree as plain nested dicts (for TOML and checkpoints)."""
    return dataclasses.asdict(cfg)


def save(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as TOML; `load(path)` gives the same tree back."""
    Path(path).write_text(tomli_w.dumps(to_dict(cfg)))
