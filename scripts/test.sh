#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the test suite: the project's one test command.
#
#   bash scripts/test.sh [pytest options ...]      e.g. bash scripts/test.sh -m "not slow"
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest -q "$@"
