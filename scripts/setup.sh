#!/usr/bin/env bash
# Make this checkout runnable: .venv, torch (CPU build), canopy itself, redis-server.
#
#   bash scripts/setup.sh
#
# Idempotent and quick when nothing changed: every step first checks whether it is
# already done (a .venv, an importable torch, a stamp of pyproject.toml, redis-server on
# PATH). All output goes to stderr, so callers keep stdout for their own results.
#
# Environment:
#   PYTHON           interpreter that creates .venv (default python3; needs 3.11+)
#   TORCH_VERSION    torch release installed when none is importable (default 2.13.0)
#   TORCH_INDEX_URL  where to take torch from; default: a CPU build found by the
#                    configured pip sources (find-links) if there is one, else the
#                    PyTorch CPU index
#   SETUP_FORCE=1    reinstall the project even if pyproject.toml did not change
set -euo pipefail
exec 1>&2

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
VENV=$ROOT/.venv
STAMP=$VENV/.canopy-setup

log() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*"; exit 1; }

# Two setups at once (two terminals, parallel CI steps) would race on .venv.
if command -v flock >/dev/null 2>&1; then
    lock="${TMPDIR:-/tmp}/canopy-setup-$(printf '%s' "$ROOT" | cksum | cut -d' ' -f1).lock"
    exec 9>"$lock"
    flock 9
fi

# ---- .venv ---------------------------------------------------------------------------
if [[ ! -x $VENV/bin/python ]]; then
    command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found: install Python 3.11+ or set PYTHON=/path/to/python3.11"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "$PYTHON is $("$PYTHON" -V 2>&1); canopy needs 3.11+: set PYTHON=/path/to/python3.11"
    log "creating .venv with $("$PYTHON" -V 2>&1)"
    "$PYTHON" -m venv "$VENV" \
        || die "python -m venv failed (on Debian/Ubuntu: apt-get install python3-venv)"
fi
"$VENV/bin/python" -c '' 2>/dev/null \
    || die ".venv/bin/python does not run (was the interpreter moved?): remove .venv and run setup again"
PY=$VENV/bin/python
PIP=("$PY" -m pip --disable-pip-version-check)

# ---- torch ---------------------------------------------------------------------------
# Only when no torch is importable: a torch the user installed (a CUDA build, say) stays.
# find_spec + metadata instead of `import torch`: same answer, seconds faster.
torch_found=$("$PY" -c 'import importlib.metadata as m, importlib.util as u
print(m.version("torch") if u.find_spec("torch") else "")' 2>/dev/null || true)
if [[ -n $torch_found ]]; then
    log "torch $torch_found already installed"
else
    spec="torch==$TORCH_VERSION"
    if [[ -n ${TORCH_INDEX_URL:-} ]]; then
        log "installing $spec from $TORCH_INDEX_URL"
        "${PIP[@]}" install "$spec" --index-url "$TORCH_INDEX_URL"
    else
        # A CPU wheel in the configured find-links (no index, no network) wins: plain pip
        # then prefers it, as `2.13.0+cpu` sorts above the registry's `2.13.0`.
        report=$(mktemp)
        local_version=""
        if "${PIP[@]}" install --dry-run --no-deps --no-index --quiet --report "$report" "$spec" \
            >/dev/null 2>&1; then
            local_version=$("$PY" -c 'import json, sys
items = json.load(open(sys.argv[1])).get("install", [])
print(items[0]["metadata"]["version"] if items else "")' "$report")
        fi
        rm -f "$report"
        if [[ $local_version == *+cpu ]]; then
            log "installing $spec (local CPU build $local_version)"
            "${PIP[@]}" install "$spec"
        else
            log "installing $spec, CPU build, from $TORCH_CPU_INDEX"
            "${PIP[@]}" install "$spec" --index-url "$TORCH_CPU_INDEX"
        fi
    fi
fi

# ---- canopy (editable) ---------------------------------------------------------------
# Editable: code changes need no reinstall; only pyproject.toml (dependencies, the
# `canopy` command) or a moved checkout do. The stamp records both.
want="$ROOT $(cksum < pyproject.toml)"
if [[ ${SETUP_FORCE:-0} != 1 && -x $VENV/bin/canopy && -f $STAMP && $(cat "$STAMP") == "$want" ]]; then
    log "canopy already installed (pyproject.toml unchanged)"
else
    log "installing canopy (pip install -e '.[test]')"
    "${PIP[@]}" install -e '.[test]'
    printf '%s\n' "$want" > "$STAMP"
fi

# ---- redis-server --------------------------------------------------------------------
if command -v redis-server >/dev/null 2>&1; then
    log "$(redis-server --version | cut -d' ' -f1-3) found"
else
    command -v apt-get >/dev/null 2>&1 \
        || die "redis-server not found and no apt-get here: install Redis 7+ and put redis-server on PATH"
    SUDO=()
    if [[ $(id -u) -ne 0 ]]; then
        command -v sudo >/dev/null 2>&1 || die "redis-server not found; run as root or install sudo"
        SUDO=(sudo)
    fi
    log "installing redis-server with apt-get"
    "${SUDO[@]}" apt-get update
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server
    command -v redis-server >/dev/null 2>&1 || die "apt-get installed redis-server but it is not on PATH"
fi

log "ready: $VENV/bin/canopy"
