"""The model ledger: one `ledger:version:<v>` hash per published version, the entry's schema.

Place in the data flow: the learner writes an entry in the same step that makes a version
visible, either in `blob.write`'s transaction or, under a lease, inside the publisher's
fenced Lua script (learner/publisher.py); both take the fields from `entry`. The entry
outlives the version's blob. Readers take the publish time with `published_at`: the
launcher (env steps at a confirmed version's publish time, cluster/verdicts.py) and the
fault and cutoff benches (publish cadence, versions a fenced learner still wrote).

The actors' side of the ledger, the version each acts with, is one key per actor
(`ledger:actor:<id>`, written by the actor itself as it switches) so that per-actor Redis
users (canopy/acl.py) can write their own entry and no other; `acting` reads them all.
"""

from __future__ import annotations

from typing import Protocol

import redis

from canopy.keys import Keys
from canopy.version import Version

PUBLISHED_AT = "published_at"  # wall-clock seconds, what every reader of the ledger asks for


class Published(Protocol):
    """What a ledger entry is made of: the fields of a version's manifest (cache/blob.py)."""

    version: Version
    learner: int
    digest: str
    published_at: float
    parent: str
    codec: str


def entry(manifest: Published, checkpoint: str | None = None) -> dict[str, str]:
    """A version's ledger fields, encoded as Redis stores them.

    `checkpoint`: the checkpoint the learner's state descends from ("" when none, stored as
    "-"); None leaves the field out, as a learner without a lease writes no checkpoints.
    """
    v = manifest.version
    fields = {
        "learner": str(manifest.learner),
        "epoch": str(v.epoch),
        "step": str(v.step),
        "digest": manifest.digest,
        PUBLISHED_AT: f"{manifest.published_at:.6f}",
    }
    if checkpoint is not None:
        fields["checkpoint"] = checkpoint or "-"
    fields["parent"] = manifest.parent or "-"
    fields["codec"] = manifest.codec
    return fields


def published_at(value: bytes | str | None) -> float | None:
    """The publish time from an entry's `published_at` field as read back; None when absent.

    An empty value counts as absent (`redis-cli --raw` prints a missing field as an empty
    line). Raises ValueError when the value is not a number.
    """
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"malformed ledger {PUBLISHED_AT} {value!r}, expected seconds") from None


def acting(r: redis.Redis, keys: Keys) -> dict[bytes, bytes]:
    """Actor id -> the version it acts with, for every actor in `alive:actor` with an entry."""
    ids = [i for i in r.zrange(keys.alive("actor"), 0, -1) if i.isdigit()]  # members are untrusted
    if not ids:
        return {}
    values = r.mget([keys.ledger_actor(int(i)) for i in ids])
    return {i: v for i, v in zip(ids, values, strict=True) if v is not None}
