#!/usr/bin/env bash
# scripts/cluster-commands.sh CONFIG [--place ROLE=HOST[,HOST...] ...] [--json]
#
# Bare metal, no docker, no ssh: prints the role commands each host of the cluster in
# CONFIG runs, host by host in start order (`canopy hosts plan`). Redis shards, replay
# shards and cache nodes run on the host of their [cluster] address; --place puts the
# learner, evaluator and actors. Copy CONFIG and cluster.password_file to every host, then
# run each host's lines there.
set -euo pipefail
usage="usage: scripts/cluster-commands.sh CONFIG [--place ROLE=HOST[,HOST...] ...] [--json]"
if [[ ${1:-} == -h || ${1:-} == --help ]]; then echo "$usage"; exit 0; fi
if [[ $# -lt 1 ]]; then echo "cluster-commands.sh: expected CONFIG ($usage)" >&2; exit 2; fi
if command -v canopy >/dev/null 2>&1; then
    exec canopy hosts plan "$@"
fi
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=python3
[[ -x $ROOT/.venv/bin/python ]] && PY=$ROOT/.venv/bin/python
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m canopy.cluster.cli hosts plan "$@"
