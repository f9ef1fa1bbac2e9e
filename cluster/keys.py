"""Every Redis key name canopy uses, in one place, so code, CLI and README never drift.

All keys live under `canopy:<run>:` with `:` separators (see README, "Redis keys").
"""

from __future__ import annotations

from cluster.version import Version


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
        """Hash: host, pid, state, started_at and Prometheus-style counters; has a TTL."""
        return f"{self.prefix}proc:{role}:{ident}"

    def alive(self, role: str) -> str:
        """Sorted set: member = id, score = liveness deadline (unix seconds)."""
        return f"{self.prefix}alive:{role}"

    @property
    def replay_members(self) -> str:
        """Sorted set: member = replay shard id, score = liveness deadline (Redis clock, unix s)."""
        return f"{self.prefix}replay:members"

    @property
    def replay_endpoints(self) -> str:
        """Hash: replay shard id -> the ZeroMQ endpoint clients connect to."""
        return f"{self.prefix}replay:endpoints"

    def control(self, role: str, ident: int) -> str:
        """List: operator commands for one process (RPUSH; taken once per heartbeat)."""
        return f"{self.prefix}control:{role}:{ident}"

    @property
    def events(self) -> str:
        """Stream of notable events (start, stop, publish, eval, rejected input)."""
        return f"{self.prefix}events"

    @property
    def epoch(self) -> str:
        """Counter INCR'd by every learner start: the epoch of its versions, and its fence."""
        return f"{self.prefix}learner:epoch"

    @property
    def model_latest(self) -> str:
        """String: newest published version id."""
        return f"{self.prefix}model:latest"

    @property
    def model_notify(self) -> str:
        """Pub/sub channel: a version id each time one is published."""
        return f"{self.prefix}model:notify"

    def model_manifest(self, version: Version) -> str:
        """Hash: digest, size, codec, layout, chunk count, learner, publish time."""
        return f"{self.prefix}model:{version}:manifest"

    def model_chunk(self, version: Version, index: int) -> str:
        return f"{self.prefix}model:{version}:chunk:{index}"

    @property
    def best(self) -> str:
        """Hash: the best confirmed version (version, model, mean, std, min, episodes, confirmed_at).

        Written by the evaluator after a confirming evaluation; its blob is pinned beside it
        (`best_manifest`, `best_chunk`), so trimming old versions never takes it away.
        """
        return f"{self.prefix}eval:best"

    @property
    def best_manifest(self) -> str:
        """Hash: the pinned copy of the best version's manifest (raw codec)."""
        return f"{self.prefix}eval:best:manifest"

    def best_chunk(self, index: int) -> str:
        return f"{self.prefix}eval:best:chunk:{index}"

    def ledger_version(self, version: Version) -> str:
        """Hash: learner id, epoch, step, parent version, digest, publish time."""
        return f"{self.prefix}ledger:version:{version}"

    @property
    def ledger_actors(self) -> str:
        """Hash: actor id -> version it acts with now."""
        return f"{self.prefix}ledger:actors"

    @property
    def lease(self) -> str:
        """String `<epoch>:<learner id>` with a TTL: the active learner's lease (fencing token)."""
        return f"{self.prefix}learner:lease"

    @property
    def learner_group(self) -> str:
        """Hash `epoch`, `store` (host:port), `world`: the data-parallel learner group to join."""
        return f"{self.prefix}learner:group"

    @property
    def ckpt_index(self) -> str:
        """Sorted set, on every shard: committed checkpoint ids, score = packed (epoch, step)."""
        return f"{self.prefix}ckpt:index"

    def ckpt_manifest(self, ckpt: str) -> str:
        """Hash, on every shard: `doc` (JSON: chunk sizes, xxh3 digests, placement) and its digest."""
        return f"{self.prefix}ckpt:{ckpt}:manifest"

    def ckpt_chunk(self, ckpt: str, index: int) -> str:
        """String on each shard the plan names; expires unless its checkpoint commits."""
        return f"{self.prefix}ckpt:{ckpt}:chunk:{index}"
