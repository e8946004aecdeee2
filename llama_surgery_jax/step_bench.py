"""One surgery training step (routers only, frozen base), reference path vs kernel path: time and peak memory.

    python -m llama_surgery_jax.step_bench                       # SmolLM2 and Llama 3.1 8B shapes, 4k/8k/16k
    python -m llama_surgery_jax.step_bench --models llama-3.1-8b --lengths 8192
    python -m llama_surgery_jax.step_bench --tiny                # CPU smoke run (kernels in interpret mode)

Random weights in bf16 (`--dtype`), batch 1, the real train step (`train.make_train_step`: AdamW on the
router parameters, gradients w.r.t. them alone). Routers start from a random route head (`--init random`,
tokens spread by content, so the mask is sparse; the table gives its token and block density) or from the
homotopy init (`--init homotopy`, the dense step 0). `--remat` recomputes each decoder layer in the
backward pass (`model.checkpointed`; without it Llama 3.1 8B at 8k needs ~61 GB of saved activations by
estimate, beside 16 GB of weights). Each row runs in a fresh process, so that `peak_bytes_in_use` is that
row's peak and an out-of-memory row does not end the others (`--in-process`
runs them here instead: the tiny test). One markdown table on stdout, all rows as JSON in `--out`.

Columns: ms = median over `--repeats` timed steps after one warm-up; peak GiB = the device's
peak_bytes_in_use (None on CPU); compiled temp GiB = XLA's scratch estimate for the step.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax

from llama_surgery_jax.cli.arguments import integer, listed, names, output_file, real, unchanged
from llama_surgery_jax.training.step_bench import (
    BACKENDS,
    LENGTHS,
    MODELS,
    TINY,
    TINY_LENGTHS,
    run_in_subprocess,
    run_row,
    table,
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated presets (configs/models)")
    parser.add_argument("--lengths", type=unchanged(listed(integer(2))),
                        help=f"comma-separated token counts (default {LENGTHS}; tiny {TINY_LENGTHS})")
    parser.add_argument("--backends", type=unchanged(names(BACKENDS)), default=",".join(BACKENDS),
                        help="any of " + ", ".join(BACKENDS))
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--init", default="random", choices=["random", "homotopy"])
    parser.add_argument("--repeats", type=integer(1), default=3)
    parser.add_argument("--remat", action="store_true", help="recompute each decoder layer in the backward pass")
    parser.add_argument("--out", type=output_file, default="step_bench.json")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer head-dim-64 model at 64/128 tokens (CPU)")
    parser.add_argument("--row-timeout", type=real(0.0, low_open=True), default=540.0,
                        help="seconds per row (own process)")
    parser.add_argument("--in-process", action="store_true", help="all rows in this process (peaks accumulate)")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # MODEL:N:BACKEND, one row, JSON on stdout
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.row:
        model_name, tokens_count, backend = args.row.split(":")
        row = run_row(model_name, int(tokens_count), backend, dtype=args.dtype, init=args.init, repeats=args.repeats,
                      remat=args.remat)
        print(json.dumps(row))
        return [row]
    models = [TINY.name] if args.tiny else args.models.split(",")
    lengths = [int(n) for n in args.lengths.split(",")] if args.lengths else TINY_LENGTHS if args.tiny else LENGTHS
    rows = []
    for model_name in models:
        for tokens_count in lengths:
            for backend in args.backends.split(","):
                if args.in_process:
                    row = run_row(model_name, tokens_count, backend, dtype=args.dtype, init=args.init,
                                  repeats=args.repeats, remat=args.remat)
                else:
                    row = run_in_subprocess(model_name, tokens_count, backend, args)
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "router"}), file=sys.stderr, flush=True)
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, dtype {args.dtype}, init {args.init}, "
          f"remat {args.remat}, batch 1, median of {args.repeats} steps")
    print(table(rows))
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
