"""Every Redis key name canopy uses, in one place, so code, CLI and docs never drift.

All keys live under `canopy:<run>:` with `:` separators. Each docstring opens with the key's
Redis type, then ": " and its content: scripts/gen_docs.py builds the key table of
docs/contracts.md from them, so keep that shape when adding a key.
"""

from __future__ import annotations

from canopy.version import Version

# Entries kept in the `metrics` stream (XADD MAXLEN ~): one per heartbeat, about 11 hours
# at the default 2 s, a few MB.
METRICS_MAXLEN = 20_000


class Keys:
    """Key names for one run.

    Example:
        keys = Keys("demo")
        keys.proc("learner", 0)  # 'canopy:demo:proc:learner:0'
    """

    def __init__(self, run: str):
        self.run = run
        self.prefix = f"canopy:{run}:"

    def proc(self, role: str, ident: int) -> str:
        """Hash: host, pid, state, started_at, updated_at, `rss_bytes`, `curve_refused_total` and
        Prometheus-style counters (`env_steps_total`, `episodes_total`, `episode_return_mean`,
        `updates_total`, `versions_published_total`, `policy_version`, `inserts_total`,
        `samples_total`, `rejected_total`, `eval_return`; with `learner.models > 1` also
        `model_losses`, `policy_model`, `eval_model_returns`, ...). Refreshed every
        `run.heartbeat_s`; its TTL is three periods."""
        return f"{self.prefix}proc:{role}:{ident}"

    def alive(self, role: str) -> str:
        """Sorted set: member = id, score = liveness deadline (unix seconds); `ZRANGEBYSCORE key
        -inf <now>` lists the dead."""
        return f"{self.prefix}alive:{role}"

    @property
    def replay_members(self) -> str:
        """Sorted set: member = replay shard id, score = liveness deadline (Redis clock, unix s;
        0 once it stopped cleanly), refreshed every `replay.member_ttl_s`/3."""
        return f"{self.prefix}replay:members"

    @property
    def replay_endpoints(self) -> str:
        """Hash: replay shard id -> the ZeroMQ endpoint clients connect to."""
        return f"{self.prefix}replay:endpoints"

    def control(self, role: str, ident: int) -> str:
        """List: operator commands for one process (RPUSH; taken once per heartbeat): `pause`,
        `resume` (actors), `checkpoint` (learners)."""
        return f"{self.prefix}control:{role}:{ident}"

    @property
    def events(self) -> str:
        """Stream: notable events (`start`, `stop`, `eval` with version and mean_return, `command`,
        checkpoint and failover events, `rejected_input`, ...), capped at about 10k entries."""
        return f"{self.prefix}events"

    @property
    def metrics(self) -> str:
        """Stream: one sample of the run's summed counters per heartbeat (`t` unix seconds,
        `env_steps`, `episodes`, `train_return`, `updates`, `loss`, `version`, `eval_return`,
        `eval_version`), written by the learner holding the lease under every launcher; what
        `canopy plot` draws. Capped at about `METRICS_MAXLEN` (20k) entries."""
        return f"{self.prefix}metrics"

    @property
    def run_config(self) -> str:
        """String: the run's resolved config as TOML, written by the learner when it takes the
        lease; operator tools given only a Redis address read the env and layout from it."""
        return f"{self.prefix}run:config"

    @property
    def epoch(self) -> str:
        """String: a counter INCR'd by every learner start; the epoch of its versions, and its fence."""
        return f"{self.prefix}learner:epoch"

    @property
    def model_latest(self) -> str:
        """String: newest published version id, `<epoch>.<step>`."""
        return f"{self.prefix}model:latest"

    @property
    def model_notify(self) -> str:
        """Pub/sub channel: a version id each time one is published."""
        return f"{self.prefix}model:notify"

    def model_manifest(self, version: Version) -> str:
        """Hash: version, epoch, step, size, digest (xxh3-64), chunks, layout (JSON), arch, codec,
        learner, published_at."""
        return f"{self.prefix}model:{version}:manifest"

    def model_chunk(self, version: Version, index: int) -> str:
        """String: raw tensor bytes of one chunk (1 MiB) of a published version."""
        return f"{self.prefix}model:{version}:chunk:{index}"

    @property
    def best(self) -> str:
        """Hash: the best confirmed version (version, model, mean, std, min, max, episodes, confirmed_at).

        Written by the evaluator after a confirming evaluation; its blob is pinned beside it
        (`best_manifest`, `best_chunk`), so trimming old versions never takes it away.
        """
        return f"{self.prefix}eval:best"

    @property
    def best_manifest(self) -> str:
        """Hash: the pinned copy of the best version's manifest (raw codec)."""
        return f"{self.prefix}eval:best:manifest"

    def best_chunk(self, index: int) -> str:
        """String: one chunk of the best version's pinned blob, never trimmed with old versions."""
        return f"{self.prefix}eval:best:chunk:{index}"

    def ledger_version(self, version: Version) -> str:
        """Hash: learner id, epoch, step, checkpoint (the one its learner's state descends from),
        parent version, codec, digest, published_at."""
        return f"{self.prefix}ledger:version:{version}"

    def ledger_actor(self, ident: int) -> str:
        """String: the version actor `ident` acts with now (its own key, so that with per-actor
        Redis users no actor can rewrite another's entry; cache/ledger.py `acting` reads them all)."""
        return f"{self.prefix}ledger:actor:{ident}"

    @property
    def lease(self) -> str:
        """String with a TTL: `<epoch>:<learner id>`, the active learner's lease (fencing token)."""
        return f"{self.prefix}learner:lease"

    @property
    def learner_group(self) -> str:
        """Hash: `epoch`, `store` (host:port), `world` of the data-parallel learner group that
        followers join (`learner.learners > 1`)."""
        return f"{self.prefix}learner:group"

    @property
    def ckpt_index(self) -> str:
        """Sorted set, on every shard: committed checkpoint ids, score = packed (epoch, step)."""
        return f"{self.prefix}ckpt:index"

    def ckpt_manifest(self, ckpt: str) -> str:
        """Hash, on every shard: `doc` (JSON: chunk sizes, xxh3 digests, placement) and its digest."""
        return f"{self.prefix}ckpt:{ckpt}:manifest"

    def ckpt_chunk(self, ckpt: str, index: int) -> str:
        """String, on each shard the plan names: one checkpoint chunk; expires unless it commits."""
        return f"{self.prefix}ckpt:{ckpt}:chunk:{index}"
