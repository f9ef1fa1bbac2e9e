#!/usr/bin/env bash
# Run once, as root, by each stage of deploy/Dockerfile that starts from a fresh base image:
#   image-setup.sh [--with-python]
# Installs redis-server (and redis-cli) from the distribution's packages, plus python3 and
# venv when asked (images that have no Python, e.g. nvidia/cuda); creates the unprivileged
# user `canopy` (uid/gid 1000, so a bind-mounted secret can be made readable to it), the
# writable run directory /var/lib/canopy, /etc/canopy for the config, and the virtual
# environment /opt/venv that canopy is installed into.
set -euo pipefail

packages=(redis-server redis-tools ca-certificates)
if [[ ${1:-} == --with-python ]]; then
    packages+=(python3 python3-venv)
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends "${packages[@]}"
rm -rf /var/lib/apt/lists/*

# Ubuntu images ship a user `ubuntu` with uid 1000; canopy takes that uid instead.
if existing=$(getent passwd 1000 | cut -d: -f1) && [[ -n $existing && $existing != canopy ]]; then
    userdel --remove "$existing" 2>/dev/null || userdel "$existing"
fi
if getent group 1000 >/dev/null && [[ $(getent group 1000 | cut -d: -f1) != canopy ]]; then
    groupdel "$(getent group 1000 | cut -d: -f1)"
fi
groupadd --gid 1000 canopy
useradd --uid 1000 --gid canopy --create-home --shell /usr/sbin/nologin canopy

install -d -o canopy -g canopy -m 0755 /var/lib/canopy
# Mount points of the compose volumes: Docker gives an empty named volume the owner and mode
# of the directory it is mounted on, so uid 1000 can write the shard's AOF and the secrets.
install -d -o canopy -g canopy -m 0700 /var/lib/canopy/run /run/secrets/canopy
# Mount points of the per-role secrets volumes the compose `keys` service fills (--split).
install -d -o canopy -g canopy -m 0700 /run/secrets/split \
  /run/secrets/split/redis /run/secrets/split/replay /run/secrets/split/cache \
  /run/secrets/split/learner /run/secrets/split/actor /run/secrets/split/evaluator
install -d -m 0755 /etc/canopy

python3 -m venv /opt/venv
