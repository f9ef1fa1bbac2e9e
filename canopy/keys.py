"""Every Redis key name canopy uses, in one place, so code, CLI and docs never drift.

All keys live under `canopy:<run>:` with `:` separators. Each docstring opens with the key's
Redis type, then ": " and its content: scripts/gen_docs.py builds the key table of
docs/contracts.md from them, so keep that shape when adding a key.

Every key family is bounded, by a TTL or a cap, and its docstring says how ("Bound: ..."):
a run's Redis memory stays flat however long it trains (`canopy bench soak` checks it).
A key added here needs its bound and the writer that enforces it.
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
        `run.heartbeat_s`. Bound: a TTL of three periods; one hash per process."""
        return f"{self.prefix}proc:{role}:{ident}"

    def alive(self, role: str) -> str:
        """Sorted set: member = id, score = liveness deadline (unix seconds); `ZRANGEBYSCORE key
        -inf <now>` lists the dead. Bound: one member per id of the role (a restart reuses its id;
        a clean stop removes it)."""
        return f"{self.prefix}alive:{role}"

    @property
    def replay_members(self) -> str:
        """Sorted set: member = replay shard id, score = liveness deadline (Redis clock, unix s;
        0 once it stopped cleanly), refreshed every `replay.member_ttl_s`/3. Bound: one member per
        shard id."""
        return f"{self.prefix}replay:members"

    @property
    def replay_endpoints(self) -> str:
        """Hash: replay shard id -> the ZeroMQ endpoint clients connect to. Bound: one field per
        shard id."""
        return f"{self.prefix}replay:endpoints"

    def control(self, role: str, ident: int) -> str:
        """List: operator commands for one process (RPUSH; taken once per heartbeat): `pause`,
        `resume` (actors), `checkpoint` (learners). Bound: what an operator pushes; its process
        takes up to 16 per heartbeat."""
        return f"{self.prefix}control:{role}:{ident}"

    @property
    def events(self) -> str:
        """Stream: notable events (`start`, `stop`, `eval` with version and mean_return, `command`,
        checkpoint and failover events, `rejected_input`, ...). Bound: every XADD caps it at about
        10k entries (MAXLEN ~, canopy/telemetry.py, cluster/supervisor.py)."""
        return f"{self.prefix}events"

    @property
    def metrics(self) -> str:
        """Stream: one sample of the run's summed counters per heartbeat (`t` unix seconds,
        `env_steps`, `episodes`, `train_return`, `updates`, `loss`, `version`, `eval_return`,
        `eval_version`), written by the learner holding the lease under every launcher; what
        `canopy plot` draws. Bound: every XADD caps it at about `METRICS_MAXLEN` (20k) entries."""
        return f"{self.prefix}metrics"

    @property
    def run_config(self) -> str:
        """String: the run's resolved config as TOML, written by the learner when it takes the
        lease; operator tools given only a Redis address read the env and layout from it. Bound: one key."""
        return f"{self.prefix}run:config"

    @property
    def epoch(self) -> str:
        """String: a counter INCR'd by every learner start; the epoch of its versions, and its fence.
        Bound: one key."""
        return f"{self.prefix}learner:epoch"

    @property
    def model_latest(self) -> str:
        """String: newest published version id, `<epoch>.<step>`. Bound: one key."""
        return f"{self.prefix}model:latest"

    @property
    def model_notify(self) -> str:
        """Pub/sub channel: a version id each time one is published. Bound: nothing is stored."""
        return f"{self.prefix}model:notify"

    def model_manifest(self, version: Version) -> str:
        """Hash: version, epoch, step, size, digest (xxh3-64), chunks, layout (JSON), arch, codec,
        learner, published_at. Bound: the publisher's newest `learner.keep_versions`; a dead
        learner's leftovers go with their ledger entry (`ledger_index`)."""
        return f"{self.prefix}model:{version}:manifest"

    def model_chunk(self, version: Version, index: int) -> str:
        """String: raw tensor bytes of one chunk (1 MiB) of a published version. Bound: deleted
        with its manifest."""
        return f"{self.prefix}model:{version}:chunk:{index}"

    @property
    def best(self) -> str:
        """Hash: the best confirmed version (version, model, mean, std, min, max, episodes, confirmed_at).

        Written by the evaluator after a confirming evaluation; its blob is pinned beside it
        (`best_manifest`, `best_chunk`), so trimming old versions never takes it away.
        Bound: one version; pinning a new best replaces it whole (cache/blob.py `pin`).
        """
        return f"{self.prefix}eval:best"

    @property
    def best_manifest(self) -> str:
        """Hash: the pinned copy of the best version's manifest (raw codec). Bound: one key."""
        return f"{self.prefix}eval:best:manifest"

    def best_chunk(self, index: int) -> str:
        """String: one chunk of the best version's pinned blob, never trimmed with old versions.
        Bound: the best version's chunks; `pin` deletes the extra ones of the previous best."""
        return f"{self.prefix}eval:best:chunk:{index}"

    def ledger_version(self, version: Version) -> str:
        """Hash: learner id, epoch, step, checkpoint (the one its learner's state descends from),
        parent version, codec, digest, published_at. Bound: the newest `learner.keep_ledger`
        (listed in `ledger_index`); the publisher deletes older ones with their blob."""
        return f"{self.prefix}ledger:version:{version}"

    def ledger_actor(self, ident: int) -> str:
        """String: the version actor `ident` acts with now (its own key, so that with per-actor
        Redis users no actor can rewrite another's entry; cache/ledger.py `acting` reads them all).
        Bound: one key per actor id."""
        return f"{self.prefix}ledger:actor:{ident}"

    @property
    def ledger_index(self) -> str:
        """Sorted set: every version with a ledger entry, score = packed (epoch, step); written with
        the entry. Bound: `learner.keep_ledger` members, trimmed oldest first by the publisher."""
        return f"{self.prefix}ledger:index"

    @property
    def lease(self) -> str:
        """String with a TTL: `<epoch>:<learner id>`, the active learner's lease (fencing token).
        Bound: one key, with a TTL."""
        return f"{self.prefix}learner:lease"

    @property
    def learner_group(self) -> str:
        """Hash: `epoch`, `store` (host:port), `world` of the data-parallel learner group that
        followers join (`learner.learners > 1`). Bound: one key."""
        return f"{self.prefix}learner:group"

    @property
    def ckpt_index(self) -> str:
        """Sorted set, on every shard: committed checkpoint ids, score = packed (epoch, step). Bound:
        `checkpoint.keep` members; the writer deletes older checkpoints."""
        return f"{self.prefix}ckpt:index"

    def ckpt_manifest(self, ckpt: str) -> str:
        """Hash, on every shard: `doc` (JSON: chunk sizes, xxh3 digests, placement) and its digest.
        Bound: one per kept checkpoint."""
        return f"{self.prefix}ckpt:{ckpt}:manifest"

    def ckpt_chunk(self, ckpt: str, index: int) -> str:
        """String, on each shard the plan names: one checkpoint chunk; expires unless it commits.
        Bound: a kept checkpoint's chunks; a pending chunk's TTL is 10 minutes."""
        return f"{self.prefix}ckpt:{ckpt}:chunk:{index}"
