#!/usr/bin/env bash
# Set up with the test dependencies and run the default test suite (slow and gpu tests deselected).
#   bash scripts/test.sh            # default suite (what CI runs: .ci/run)
#   bash scripts/test.sh -m slow    # the slow tests
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=test bash scripts/setup.sh
. .venv/bin/activate
exec python -m pytest "$@"
