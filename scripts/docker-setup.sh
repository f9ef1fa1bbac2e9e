#!/usr/bin/env bash
# Make a Docker engine available to the tests marked `docker` (tests/deploy/test_docker.py),
# so they run instead of skipping. CI calls it (.ci/run) before scripts/test.sh.
#
#   bash scripts/docker-setup.sh
#
# Idempotent and quiet when done: an engine that already answers is used as it is. Otherwise,
# where the machine allows it (root, apt-get), installs Debian's docker.io (plus debootstrap,
# and docker-compose when the CLI has no compose plugin), starts dockerd in the background
# (log: $DOCKERD_LOG) and waits for it. When the Dockerfile's default base image cannot be
# pulled (no registry reachable), makes the local one (deploy/make-base-image.sh), which the
# tests then build on. Never fails the caller: where no engine can be had it says why, and
# the docker tests skip.
#
# Environment:
#   DOCKERD_LOG   dockerd's log (default ${TMPDIR:-/tmp}/canopy-dockerd.log)
set -uo pipefail
exec 1>&2

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DOCKERD_LOG=${DOCKERD_LOG:-${TMPDIR:-/tmp}/canopy-dockerd.log}
BASE_IMAGE=python:3.11-slim-bookworm # deploy/Dockerfile's default PYTHON_IMAGE
LOCAL_BASE=canopy-base:bookworm      # deploy/make-base-image.sh's default tag
ENGINE_WAIT_S=60

log() { printf 'docker-setup: %s\n' "$*"; }
give_up() {
    log "$* (the docker tests will skip)"
    exit 0
}
engine_up() { docker info >/dev/null 2>&1; }

if ! engine_up; then
    [[ $(id -u) -eq 0 ]] || give_up "no Docker engine answers and starting one needs root"
    command -v apt-get >/dev/null 2>&1 || give_up "no Docker engine answers and no apt-get to install one"
    packages=()
    command -v dockerd >/dev/null 2>&1 || packages+=(docker.io)
    command -v debootstrap >/dev/null 2>&1 || packages+=(debootstrap)
    if ! { command -v docker >/dev/null 2>&1 && docker compose version >/dev/null 2>&1; } \
        && ! command -v docker-compose >/dev/null 2>&1; then
        packages+=(docker-compose)
    fi
    if ((${#packages[@]})); then
        log "installing ${packages[*]} with apt-get"
        { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${packages[@]}"; } \
            >/dev/null || give_up "apt-get install ${packages[*]} failed"
    fi
    if ! pgrep -x dockerd >/dev/null; then
        log "starting dockerd (log: $DOCKERD_LOG)"
        # setsid: the engine outlives this script and the test run's process group.
        setsid dockerd >"$DOCKERD_LOG" 2>&1 </dev/null &
    fi
    for ((i = 0; i < ENGINE_WAIT_S; i++)); do
        engine_up && break
        sleep 1
    done
    engine_up || give_up "dockerd did not answer in ${ENGINE_WAIT_S}s: $(tail -n 3 "$DOCKERD_LOG" 2>/dev/null)"
fi

# The base image: the official one where a registry answers, else a local one.
if ! docker image inspect "$LOCAL_BASE" >/dev/null 2>&1 \
    && ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 \
    && ! timeout 300 docker pull -q "$BASE_IMAGE" >/dev/null 2>&1; then
    [[ $(id -u) -eq 0 ]] || give_up "cannot pull $BASE_IMAGE and making $LOCAL_BASE needs root"
    log "cannot pull $BASE_IMAGE: making $LOCAL_BASE (deploy/make-base-image.sh, a few minutes)"
    base_log=${TMPDIR:-/tmp}/canopy-base-image.log
    bash "$ROOT/deploy/make-base-image.sh" "$LOCAL_BASE" >"$base_log" 2>&1 \
        || give_up "deploy/make-base-image.sh failed (log: $base_log)"
fi
