#!/usr/bin/env bash
# Router training on two GPUs (issue: data-parallel and FSDP runs that match one GPU). NOT RUN YET: the
# nvidia-h200-x2 kind was not lent. One device call on `nvidia-h200-x2`, from the repository root, after the
# `setup` and `train` GGUF steps of ../h200-block-routing/run.sh (same carries; same /tmp layout).
# NVLink multicast stays off (KINDS.md). $OUT is the device tool's output folder.
set -euo pipefail
export PYTHONPATH=/tmp/site:$PWD WIKITEXT2_DIR=/tmp/w/wikitext-2 LLAMA_SURGERY_CACHE=/tmp/cache NCCL_NVLS_ENABLE=0
common="--preset default steps=20 checkpoint_every=5 report=false"
# 1. data parallel, one process with both GPUs, against one GPU (same seed, same global batch of 4)
CUDA_VISIBLE_DEVICES=0 python3 -m llama_surgery_jax.train $common --out /tmp/one
python3 -m llama_surgery_jax.train $common mesh_data=2 --out /tmp/dp
# 1b. the same as two processes through jax.distributed.initialize (NCCL)
for i in 0 1; do
  CUDA_VISIBLE_DEVICES=$i python3 -m llama_surgery_jax.train $common mesh_data=2 --out /tmp/dp2p \
    --coordinator localhost:12355 --num-processes 2 --process-id $i > "$OUT/dp2p-$i.log" 2>&1 &
done; wait
# 2. the Llama 3.1 8B config, random bf16 weights, FSDP over 2 GPUs: one step at 8k, time and peak memory
python3 -m convert.scale_check --work /tmp/sc --json "$OUT/scale_check.json"   # leaves /tmp/sc/converted
fsdp="model=/tmp/sc/converted seq_len=8192 batch_size=2 steps=2 report=false remat=true param_dtype=bfloat16 \
compute_dtype=bfloat16 router.levels=7 router.block_size=128"
CUDA_VISIBLE_DEVICES=0 python3 -m llama_surgery_jax.train --preset default $fsdp --out /tmp/fsdp1
python3 -m llama_surgery_jax.train --preset default $fsdp mesh_fsdp=2 --out /tmp/fsdp2
# 3. kill one process mid-run, rerun, compare with the uninterrupted /tmp/dp2p bitwise
for i in 0 1; do
  CUDA_VISIBLE_DEVICES=$i timeout 60 python3 -m llama_surgery_jax.train $common mesh_data=2 --out /tmp/killed \
    --coordinator localhost:12356 --num-processes 2 --process-id $i > "$OUT/killed-$i.log" 2>&1 &
done; wait || true
for i in 0 1; do
  CUDA_VISIBLE_DEVICES=$i python3 -m llama_surgery_jax.train $common mesh_data=2 --out /tmp/killed \
    --coordinator localhost:12357 --num-processes 2 --process-id $i > "$OUT/resumed-$i.log" 2>&1 &
done; wait
for run in one dp dp2p fsdp1 fsdp2 killed; do cp /tmp/$run/metrics.jsonl "$OUT/$run.metrics.jsonl"; done
python3 - <<'PY'
import json, os
out = os.environ["OUT"]
load = lambda r: [json.loads(l) for l in open(f"{out}/{r}.metrics.jsonl")]
one = load("one")
for run in ("dp", "dp2p"):
    other = load(run)
    rel = max(abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in zip(one, other))
    print(run, "max relative loss difference over 20 steps:", rel,
          "tokens/s:", sum(r["tokens_per_s"] for r in other[1:]) / len(other[1:]),
          "vs one GPU", sum(r["tokens_per_s"] for r in one[1:]) / len(one[1:]))
print("killed+resumed == uninterrupted:", [r["loss"] for r in load("killed")] == [r["loss"] for r in load("dp2p")])
PY
