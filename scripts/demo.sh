#!/usr/bin/env bash
# The main job on a fresh machine: set up, write a sample corpus, curate it on local Ray, audit it for
# benchmark contamination.
#   ROWS=50000 bash scripts/demo.sh     # a bigger corpus
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ROWS=${ROWS:-5000}
curation sample ./sample --rows "$ROWS"
curation run pipelines/demo.yaml --set vars.corpus=./sample --set vars.out=./pools/demo --overwrite
curation audit --benchmarks pipelines/benchmarks.yaml --set vars.corpus=./sample --overwrite \
  --corpus ./sample/image_text ./sample/interleaved ./sample/text ./sample/video --out ./audit
