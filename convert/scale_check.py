"""The converter at real scale: a random Llama-3.1-8B-layout checkpoint, converted, checked against transformers.

    python -m convert.scale_check --work DIR [--tokens 256] [--json FILE]      (a GPU machine, ~50 GB of disk)

1. transformers builds LlamaForCausalLM from `configs/models/llama-3.1-8b.json` with random bf16 weights
   and saves it as Meta ships it: bf16 safetensors in 4 shards with their index.
2. `convert/hf_to_flax.py` converts it in a child process: wall time and the child's peak RSS.
3. Logits of the same random tokens: transformers (torch, float32, no TF32) against the converted model
   (JAX, float32, highest matmul precision), both on the GPU from the same bf16 weights.
Prints one table and writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_checkpoint(folder: Path, preset: str = "llama-3.1-8b", shard_size: str = "5GB") -> float:
    """Random bf16 weights of a preset (configs/models), sharded as Meta ships 8B (4 shards of ≤ 5 GB + index);
    returns seconds."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    start = time.perf_counter()
    hf = json.loads((REPO / "configs" / "models" / f"{preset}.json").read_text())
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(LlamaConfig(**hf))
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(folder, safe_serialization=True, max_shard_size=shard_size)
    del model
    torch.cuda.empty_cache()
    return time.perf_counter() - start


def convert_in_child(source: Path, out: Path) -> tuple[float, float]:
    """Runs the converter in its own process → (wall seconds, peak RSS GiB of that process)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "convert" / "hf_to_flax.py"), str(source), str(out)], check=True,
                   cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu",
                                        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])})
    wall = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux: KiB
    return wall, peak_kib / 2**20


def parity(source: Path, converted: Path, tokens: int) -> dict:
    """Relative Frobenius error of float32 logits, ours against transformers', on random token ids."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    rng = np.random.default_rng(0)
    ids = rng.integers(0, json.loads((source / "config.json").read_text())["vocab_size"], size=(1, tokens))
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).to(device).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor(ids).to(device)).logits.float().cpu().numpy()
    del hf
    torch.cuda.empty_cache()

    import jax
    from flax import nnx

    from llama_surgery_jax.model.checkpoint import load_model
    from llama_surgery_jax.model.config import Precision

    # The weights enter the jit as an argument: closed over, 32 GB would be baked into the program as constants.
    graphdef, state = nnx.split(load_model(converted, Precision("float32", "float32")))
    with jax.default_matmul_precision("highest"):
        logits = jax.jit(lambda state, t: nnx.merge(graphdef, state)(t)[0])(state, jax.numpy.asarray(ids))
        ours = np.asarray(logits)
    diff = ours.astype(np.float64) - theirs
    return {"tokens": tokens, "relative_error": float(np.linalg.norm(diff) / np.linalg.norm(theirs)),
            "max_abs_diff": float(np.abs(diff).max()), "max_abs_logit": float(np.abs(theirs).max()),
            "argmax_agreement": float(np.mean(ours.argmax(-1) == theirs.argmax(-1)))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", required=True, help="scratch folder for the checkpoint and its conversion")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--preset", default="llama-3.1-8b", help="configs/models preset (tiny: a CPU dry run)")
    parser.add_argument("--shard-size", default="5GB", help="safetensors shard size (5GB: Meta's 4 shards for 8B)")
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args(argv)
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch and JAX share the GPU
    work = Path(args.work).absolute()
    source, converted = work / f"hf-{args.preset}-random", work / "converted"
    make_s = make_checkpoint(source, args.preset, args.shard_size)
    shards = sorted(p.name for p in source.glob("*.safetensors"))
    size_gb = sum(p.stat().st_size for p in source.glob("*.safetensors")) / 1e9
    print(f"made {len(shards)} shards, {size_gb:.2f} GB, in {make_s:.0f} s", flush=True)
    wall, peak = convert_in_child(source, converted)
    print(f"converted in {wall:.0f} s, peak RSS {peak:.1f} GiB", flush=True)
    result = {"checkpoint": {"shards": shards, "index": (source / "model.safetensors.index.json").is_file(),
                             "gb": size_gb, "make_s": make_s},
              "conversion": {"wall_s": wall, "peak_rss_gib": peak}, "parity": parity(source, converted, args.tokens)}
    p = result["parity"]
    print("| checkpoint | shards | conversion wall | peak RSS | logits rel. error | max abs diff | argmax agreement |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print(f"| random {args.preset}, bf16, {size_gb:.2f} GB | {len(shards)} + index | {wall:.0f} s | {peak:.1f} GiB | "
          f"{p['relative_error']:.2e} | {p['max_abs_diff']:.2e} (max logit {p['max_abs_logit']:.2f}) | "
          f"{p['argmax_agreement']:.4f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
