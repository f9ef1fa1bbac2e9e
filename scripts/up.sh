#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the whole cluster on this machine until solved.
#
#   bash scripts/up.sh [canopy up options ...]
#   ENV=Acrobot-v1 STOP=-100 bash scripts/up.sh --time-limit 300
#
# ENV is the gymnasium id (default CartPole-v1), STOP the greedy evaluation return that
# counts as solved (default 475). The summary JSON is the only thing on stdout.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/canopy" up --env "${ENV:-CartPole-v1}" --stop-at-return "${STOP:-475}" "$@"
