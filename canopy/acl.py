"""Least-privilege Redis users, one per role, written into every shard's config.

Place in the data flow: `canopy up` (and a deployment's Redis config) creates these users
next to the operator user; each role process connects as its own user (the role name,
with its own generated password), so a compromised actor cannot publish a policy, write
or delete a checkpoint, take the learner lease or rewrite another role's stats.

What each role may touch, under the run's prefix `canopy:<run>:`:

| user | reads | writes |
|---|---|---|
| learner | the whole run | the whole run: model, ledger, lease, epoch, ckpt |
| actor | model, replay membership, epoch | own stats, liveness, control list |
| evaluator | model, replay membership, epoch | own stats, liveness, control list; `eval:*` (best version) |
| cache | model, epoch | own stats, liveness, control list |
| replay | - | own stats, liveness, control list; replay membership |
| status | the whole run | nothing (an operator's read-only view, `canopy status`) |

Every role but `status` may also append to `events` (XADD only, through an ACL selector,
so it cannot delete or trim the stream), and actors and the evaluator may set their own
entry in `ledger:actors` (HSET only).

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


def _own(role: str) -> list[str]:
    return [p.format(role=role) for p in _TELEMETRY]


def _key_rules(role: str) -> tuple[list[str], list[str]]:
    """(read-write, read-only) key patterns relative to the run prefix."""
    if role == "learner":
        return ["*"], []
    if role == "status":
        return [], ["*"]
    if role == "actor":
        return _own(role), ["model:*", "replay:*", "learner:epoch"]
    if role == "evaluator":
        return [*_own(role), "eval:*"], ["model:*", "replay:*", "learner:epoch"]
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
    if role in ("actor", "evaluator"):
        selectors.append(f"(%W~{prefix}ledger:actors +hset)")
    return " ".join(["resetkeys", *keys, "resetchannels", *channels, commands, *selectors])


def user_line(role: str, run: str, password: str) -> str:
    """A `user` directive for redis.conf: the role's user, on, with its password and rules."""
    return f"user {role} on resetpass >{password} {rules(role, run)}"
