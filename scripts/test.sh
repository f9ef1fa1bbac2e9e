#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the test suite: the project's one test command.
#
#   bash scripts/test.sh [pytest options ...]      e.g. bash scripts/test.sh -m "not slow"
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
"$ROOT/.venv/bin/python" -m pytest -q "$@"
if [ $# -eq 0 ]; then
  # The whole suite's run: the fuzz suite again with every Redis fixture TLS-only (cluster.tls).
  CANOPY_TEST_TLS=1 "$ROOT/.venv/bin/python" -m pytest -q tests/fuzz
fi
