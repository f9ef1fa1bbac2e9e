#!/usr/bin/env bash
# scripts/role.sh ROLE CONFIG ID [--set key=value ...] [--standby (learner only)]
#
# What every per-role launch script (scripts/<role>.sh) runs: checks the arguments, then
# execs `canopy ROLE --config CONFIG --id ID [--set ...]`, or `python -m canopy.cluster.cli` when
# `canopy` is not on PATH, so signals reach the role itself.
set -euo pipefail
role=${1:?usage: scripts/role.sh ROLE CONFIG ID [--set key=value ...]}
shift
usage="usage: scripts/$role.sh CONFIG ID [--set key=value ...]"
fail() { printf '%s.sh: %s (%s)\n' "$role" "$1" "$usage" >&2; exit 2; }

if [[ ${1:-} == -h || ${1:-} == --help ]]; then echo "$usage"; exit 0; fi
[[ $# -ge 2 ]] || fail "expected CONFIG and ID, got $# argument(s)"
CONFIG=$1
ID=$2
shift 2
[[ $ID =~ ^[0-9]+$ ]] || fail "ID must be a non-negative integer, got '$ID'"
[[ -f $CONFIG ]] || fail "config file '$CONFIG' not found"
rest=("$@")
while [[ ${#rest[@]} -gt 0 ]]; do
    case ${rest[0]} in
        --set=?*) rest=("${rest[@]:1}") ;;
        --set) [[ ${#rest[@]} -ge 2 && ${rest[1]} == ?*=* ]] || fail "--set needs key=value"
               rest=("${rest[@]:2}") ;;
        --standby) [[ $role == learner ]] || fail "--standby is for the learner only"
                   rest=("${rest[@]:1}") ;;
        *) fail "unexpected argument '${rest[0]}'" ;;
    esac
done

if command -v canopy >/dev/null 2>&1; then
    exec canopy "$role" --config "$CONFIG" --id "$ID" "$@"
fi
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=python3
[[ -x $ROOT/.venv/bin/python ]] && PY=$ROOT/.venv/bin/python
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m canopy.cluster.cli "$role" --config "$CONFIG" --id "$ID" "$@"
