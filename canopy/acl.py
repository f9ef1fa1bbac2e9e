"""Least-privilege Redis users, one per role, written into every shard's config.

Place in the data flow: `canopy up` (and a deployment's Redis config) creates these users
next to the operator user; each role process connects as its own user (the role name,
with its own generated password), so a compromised actor cannot publish a policy, write
or delete a checkpoint, take the learner lease or rewrite another role's stats.

What each role may touch, under the run's prefix `canopy:<run>:`:

| user | reads | writes |
|---|---|---|
| learner | the whole run | the whole run: model, ledger, lease, epoch, ckpt |
| actor | model, replay membership, epoch | own stats, liveness, control list, ledger entry |
| evaluator | model, replay membership, epoch | own stats, liveness, control list; `eval:*` (best version) |
| actor-<id> | as actor | that id's stats, control list and ledger entry; liveness |
| cache | model, epoch | own stats, liveness, control list |
| replay | - | own stats, liveness, control list; replay membership |
| status | the whole run | nothing (an operator's read-only view, `canopy status`) |

Every role but `status` may also append to `events` (XADD only, through an ACL selector,
so it cannot delete or trim the stream).

Per-actor users (`cluster.actor_users`): a role user is shared by every process of the role,
so one `actor` password lets any actor overwrite another's stats or ledger entry. With
actor_users each actor id has its own user, `actor-<id>`, whose write patterns name only
that id's keys: `proc:actor:<id>`, `control:actor:<id>`, `ledger:actor:<id>`. Redis itself
refuses actor 3 writing actor 4's keys (NOPERM), so no broker sits on the telemetry path.
Still shared by all actors: `alive:actor` (one sorted set, member = id, that every actor
moves its own deadline in; ACL key patterns cannot split a key by member) and `events`.
The users are written into every shard's config by whoever holds the operator password
(`canopy up`, or the operator step that writes a deployment's redis.conf), one per id in
`0..actors.count-1`; each actor process needs only its own password file.

Commands: data reads and writes, transactions, Lua scripts and the connection commands the
clients use (`CLIENT SETNAME`); no admin or dangerous commands (FLUSHALL, CONFIG, KEYS,
DEBUG...). Redis checks every command a script runs, and its keys, against the same rules.
"""

from __future__ import annotations

ROLES = ("learner", "actor", "evaluator", "cache", "replay", "status")

# Data commands, minus FLUSHALL, KEYS, DEBUG and the like; CLIENT SETNAME names every
# connection (telemetry.py).
# Lua too: replay membership and the learner's fenced publish and commit are scripts, and
# Redis applies these same rules to every command a script runs (TIME: membership
# deadlines come from the Redis clock).
_BASE_COMMANDS = (
    "-@all +@read +@write +@transaction +@connection +@scripting +time -@dangerous +client|setname"
)
_EXTRA_COMMANDS = {
    "learner": "+publish +info",  # notify; store.py tells a restarted shard by its run_id
    "cache": "+subscribe +unsubscribe",
}
# Its stats, liveness and control list; and the id claims of canopy-scaled (deploy/scaled.py),
# which picks a scaled replica's id as that role.
_TELEMETRY = ["proc:{role}:*", "alive:{role}", "control:{role}:*", "deploy:claim:{role}:*"]


_ACTOR_READS = ["model:*", "replay:*", "learner:epoch"]


def _own(role: str) -> list[str]:
    return [p.format(role=role) for p in _TELEMETRY]


def _key_rules(role: str) -> tuple[list[str], list[str]]:
    """(read-write, read-only) key patterns relative to the run prefix."""
    if role == "learner":
        return ["*"], []
    if role == "status":
        return [], ["*"]
    if role == "actor":
        return [*_own(role), "ledger:actor:*"], _ACTOR_READS
    if role == "evaluator":
        return [*_own(role), "eval:*"], _ACTOR_READS
    if role == "cache":
        return _own(role), ["model:*", "learner:epoch"]
    if role == "replay":
        return [*_own(role), "replay:*"], []
    raise ValueError(f"no Redis user for role {role!r}: known roles are {', '.join(ROLES)}")


def rules(role: str, run: str) -> str:
    """The ACL rules (after the user name and password) for `role` in run `run`."""
    prefix = f"canopy:{run}:"
    rw, ro = _key_rules(role)
    keys = [f"~{prefix}{p}" for p in rw] + [f"%R~{prefix}{p}" for p in ro]
    commands = _BASE_COMMANDS
    if role == "status":
        commands = commands.replace("+@write ", "").replace("+@scripting ", "")
    commands = f"{commands} {_EXTRA_COMMANDS.get(role, '')}".strip()
    channels = [f"&{prefix}model:notify"] if role in ("cache", "learner") else []
    # Selectors: a command allowed on one key only, whatever the root rules allow.
    selectors = [] if role in ("learner", "status") else [f"(%W~{prefix}events +xadd)"]
    return " ".join(["resetkeys", *keys, "resetchannels", *channels, commands, *selectors])


def actor_user(ident: int) -> str:
    """The Redis user of actor `ident` under `cluster.actor_users`."""
    if ident < 0:
        raise ValueError(f"actor id {ident} is negative")
    return f"actor-{ident}"


def actor_rules(ident: int, run: str) -> str:
    """The ACL rules of actor `ident`'s own user: the actor role's, with writes to its keys only."""
    prefix = f"canopy:{run}:"
    own = ["proc:actor:{i}", "control:actor:{i}", "ledger:actor:{i}", "alive:actor"]
    keys = [f"~{prefix}{p.format(i=ident)}" for p in own] + [f"%R~{prefix}{p}" for p in _ACTOR_READS]
    selector = f"(%W~{prefix}events +xadd)"
    return " ".join(["resetkeys", *keys, "resetchannels", _BASE_COMMANDS, selector])


def actor_user_line(ident: int, run: str, password: str) -> str:
    """A `user` directive for redis.conf: actor `ident`'s own user, on, with its password."""
    return f"user {actor_user(ident)} on resetpass >{password} {actor_rules(ident, run)}"


def user_line(role: str, run: str, password: str) -> str:
    """A `user` directive for redis.conf: the role's user, on, with its password and rules."""
    return f"user {role} on resetpass >{password} {rules(role, run)}"
