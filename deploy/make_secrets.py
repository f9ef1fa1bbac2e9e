#!/usr/bin/env python3
"""Entrypoint of the deploy files' one-shot secrets step: `canopy-secrets DIR`.

Place in the data flow: runs before any role (compose service `keys`; for Kubernetes the
operator runs it once into deploy/k8s/secrets, which kustomize turns into a Secret) and
fills DIR, which every role then mounts read-only:

    DIR/curve/                    CURVE keys, as `canopy keys DIR/curve` makes them
                                  (cluster.curve_dir): server/<server>.key_secret per server,
                                  <role>/<role>.key_secret per client role, authorized/<role>/
                                  (canopy/curve.py); each role mounts only its own secrets
    DIR/redis.password            the operator user's password (cluster.password_file)
    DIR/redis.<role>.password     one per least-privilege Redis user of canopy/acl.py
                                  (cluster.role_users), for learner actor evaluator cache
                                  replay status
    DIR/tls/                      Redis over TLS (cluster.tls, canopy/tls.py): ca.crt for
                                  every role, redis.crt and redis.key for the shards only;
                                  the certificate names the shards of the shipped deploy
                                  files (REDIS_NAMES); other names: `canopy tls DIR --name ...`

`canopy-secrets DIR --split OUT` then copies into OUT/<role>/ exactly the files that role's
containers read (`role_files`: its own Redis password and the probes' read-only one, the CA,
its CURVE files; the Redis shards: every password and the server key), so compose can mount
each role's folder alone, as the Kubernetes manifests mount each pod's items of the Secret.
Each run copies them again, so a rotated key reaches every role's folder.

Only what is absent is made, so a rerun (every `docker compose up`) keeps the keys and
passwords that running shards and roles already hold. Files are mode 600, owned by whoever
runs this (uid 1000 in the image, the uid of every role); nothing secret is printed.
Installed in the image as /usr/local/bin/canopy-secrets.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
from pathlib import Path

from canopy import acl, curve, tls
from canopy.config import ClusterConfig
from canopy.errors import UserError
from canopy.redisconn import role_password_file

# The host names the shipped deploy files reach the Redis shards by: compose services, then
# the pods of deploy/k8s/redis.yaml behind their headless Service.
REDIS_NAMES = ("redis0", "redis1", "redis-0.redis", "redis-1.redis")


def password_files(directory: Path) -> list[Path]:
    """The operator's password file, then one per role user, named as the roles look them up."""
    cluster = ClusterConfig(password_file=str(directory / "redis.password"))
    return [Path(cluster.password_file)] + [role_password_file(cluster, role) for role in acl.ROLES]


def make(directory: Path) -> list[Path]:
    """Create the missing keys and passwords under `directory`; returns what was created."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    made = curve.complete(directory / "curve")
    for path in password_files(directory):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(24) + "\n")
        made.append(path)
    tls_dir = directory / "tls"
    if not (tls_dir / tls.CA_CERT).exists():
        tls.generate(tls_dir, REDIS_NAMES)
        made += [tls_dir / tls.CA_CERT, tls_dir / tls.SERVER_CERT, tls_dir / tls.SERVER_KEY]
    return made


# The roles a deployment runs containers of; each gets its own folder with --split.
SPLIT_ROLES = ("redis", "replay", "cache", "learner", "actor", "evaluator")


def role_files(directory: Path, role: str) -> list[str]:
    """The files under `directory` that containers of `role` read (paths relative to it)."""
    if role == "redis":  # redis.conf names every user; the shard serves TLS
        server = ["tls/" + tls.CA_CERT, "tls/" + tls.SERVER_CERT, "tls/" + tls.SERVER_KEY]
        return [p.name for p in password_files(directory)] + server
    files = [f"redis.{role}.password", "redis.status.password", "tls/" + tls.CA_CERT]
    for mount in curve.mounts(role):
        if mount.endswith("/"):  # a folder: the allow-lists, one file per authorized key
            found = sorted((directory / "curve" / mount).rglob("*.key"))
            files += [p.relative_to(directory).as_posix() for p in found]
        else:
            files.append(f"curve/{mount}")
    return files


def split(directory: Path, out: Path) -> None:
    """Copy each role's files from `directory` into `out/<role>/`, modes kept, replacing older copies."""
    for role in SPLIT_ROLES:
        for name in role_files(directory, role):
            dest = out / role / name
            dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = dest.with_name(dest.name + ".tmp")
            shutil.copy2(directory / name, tmp)
            os.replace(tmp, dest)  # a reader sees the old file or the new one, never half of one


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 3) or (len(argv) == 3 and argv[1] != "--split"):
        print(
            "usage: canopy-secrets DIR [--split OUT]  (CURVE keys, Redis passwords and TLS files for "
            "the deploy files; --split: each role's files in OUT/<role>)",
            file=sys.stderr,
        )
        return 2
    try:
        made = make(Path(argv[0]))
        if len(argv) == 3:
            split(Path(argv[0]), Path(argv[2]))
    except UserError as exc:  # e.g. keys of the old one-keypair layout there
        print(f"canopy-secrets: {exc}", file=sys.stderr)
        return 2
    names = ", ".join(p.relative_to(argv[0]).as_posix() for p in made)
    names = names or "nothing: every key and password exists"
    print(f"canopy-secrets: {argv[0]}: made {names}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
