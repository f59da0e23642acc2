#!/usr/bin/env bash
# scripts/up.sh [QMESH UP OPTIONS...] — set up (venv, extension) and run the
# whole mesh on this box: `qmesh up`. Options pass through, e.g. --ephemeral,
# --port-offset 100, --data-dir DIR, --config FILE.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/scripts/setup.sh"
exec "$ROOT/.venv/bin/qmesh" up "$@"
