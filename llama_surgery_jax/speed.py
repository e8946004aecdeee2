"""Prefill speed of the surgery model against the dense model it came from, end to end, in one table.

    python -m llama_surgery_jax.speed [--models smollm2,llama-3.1-8b] [--lengths smollm2:8192,llama-3.1-8b:32768+131072]
        [--densities 0.1,0.2] [--tiles smollm2:64+128] [--reps 3] [--check-length 8192] [--run RUN] [--out DIR]
        [--router-query block|row]

What a user runs: the whole prefill as one `jax.jit` per shape, bf16, batch 1, the KV cache written, and the
logits of the last position only (prefill needs no more; an 8B model's logits over a 128k prompt would be 67 GB).
Dense runs cuDNN flash attention; surgery runs, in every layer, router → block codes → the budget's tile mask
(`block_routing.select_by_depth`) → the schedule → `block_sparse_attention` (the Hopper kernel at tile 128, the
Triton one otherwise). The density is a traced argument: one compiled surgery program serves every ρ.

Models: `smollm2` is the embedded SmolLM2-135M-Instruct (its real weights) with the default preset's block
routers, random unless --run gives a trained block run; `llama-3.1-8b` is that config with random bf16 weights
and random block routers (tile 128, one route per KV head, W = 128); --router-query row makes the random routers
rank key blocks per query row (4 trees; tiles computed from the first row that chose them, `block_routing.select_rows`).
Prompts are random token ids: the budget fixes the executed density whatever the text, and the table prints the
density counted from the executed tiles.

Rows (`prefill`): median seconds of --reps runs after a warm-up, tokens/s, the speedup over dense, and the
compiled program's device memory (arguments + outputs + temporaries, XLA's memory analysis). Rows (`layer`):
one decoder layer's pieces on random inputs, × layers: the router (block features, codes, the budget's tiles),
the schedule, the sparse kernel (schedule included), dense cuDNN attention; the router and schedule as a
fraction of the sparse attention. Rows (`check`): at --check-length, the prefill on the kernels against the
evaluation forward on the reference attention (`tile_masked_attention`) replaying the same tiles: relative
error of the final hidden states and last logits, and whether the greedy next token agrees.
Rows (`decode`): decode tokens/s at --decode settings (context x batch), dense against surgery, per host-dispatched
step and (--decode-loop) in device loops, with KV bytes read per step and program memory; --profile-steps adds a
trace per row (`decode_speed`, `profiling`). Writes OUT/speed.json (rows as they finish) and OUT/speed.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax

from llama_surgery_jax.cli.arguments import command, density, integer, listed, names, output_folder
from llama_surgery_jax.evaluation.decode_speed import DENSE_ATTENTIONS
from llama_surgery_jax.evaluation.speed_report import SECTIONS, SpeedSettingError, run_speed


def per_model(text: str, cast) -> dict:
    """'smollm2:8192,llama-3.1-8b:32768+131072' → {'smollm2': [8192], 'llama-3.1-8b': [32768, 131072]}."""
    out = {}
    for item in filter(None, text.split(",")):
        name, _, values = item.partition(":")
        out[name] = [cast(v) for v in values.split("+") if v]
    return out


def decode_settings(text: str) -> dict:
    """'llama-3.1-8b:131072x1+32768x8' → {'llama-3.1-8b': [(131072, 1), (32768, 8)]}."""
    return per_model(text, lambda value: tuple(int(v) for v in value.split("x")))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The settings, each checked (a bad one exits with status 2 and a message that names it)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--models", default="smollm2,llama-3.1-8b")
    parser.add_argument("--lengths", type=lambda s: per_model(s, integer(1)),
                        default=per_model("smollm2:8192,llama-3.1-8b:32768+131072", int))
    parser.add_argument("--tiles", type=lambda s: per_model(s, integer(1)), default=per_model("smollm2:64+128", int),
                        help="router tiles per model (default: SmolLM2 at the preset's 64 and at 128; 8B at 128)")
    parser.add_argument("--densities", type=listed(density), default=[0.1, 0.2])
    parser.add_argument("--reps", type=integer(1), default=3)
    parser.add_argument("--check-length", type=integer(0), default=8192, help="0: no logits check")
    parser.add_argument("--decode", type=decode_settings, default=decode_settings("smollm2:8192x1,"
                                                                                  "llama-3.1-8b:131072x1+32768x8"),
                        help="decode settings per model, context x batch")
    parser.add_argument("--decode-steps", type=integer(1), default=32)
    parser.add_argument("--decode-dense", type=names(tuple(DENSE_ATTENTIONS)), default="kernel,cudnn,masked",
                        help="dense decode attentions to time: kernel (flash-decoding), cudnn, masked (XLA)")
    parser.add_argument("--decode-loop", action="store_true",
                        help="also time the steps as one program (greedy_decode), without the host between steps")
    parser.add_argument("--profile-steps", type=integer(0), default=0, help="trace this many decode steps per row")
    parser.add_argument("--skip", type=names(SECTIONS), default="",
                        help="comma list of sections to skip: " + ", ".join(SECTIONS))
    parser.add_argument("--run", help="a trained block run: SmolLM2 with its routers instead of random ones")
    parser.add_argument("--router-query", choices=("block", "row"), default="block",
                        help="random routers: one code per query block, or per query row (router.query=row: each row "
                             "ranks key blocks from its own query, tiles computed from their first row)")
    parser.add_argument("--out", type=output_folder, default="speed")
    args = parser.parse_args(argv)
    return args


def run(args: argparse.Namespace) -> int:
    if jax.default_backend() != "gpu":
        print("warning: no GPU; the kernels run in interpret mode and the numbers mean nothing", file=sys.stderr)
    try:
        text = run_speed(Path(args.out), models=list(filter(None, args.models.split(","))), lengths=args.lengths,
                         tiles=args.tiles, densities=args.densities, reps=args.reps, check_length=args.check_length,
                         decode=args.decode, decode_steps=args.decode_steps,
                         decode_dense=args.decode_dense, decode_loop=args.decode_loop,
                         profile_steps=args.profile_steps, skip=set(args.skip),
                         run=args.run, query=args.router_query)
    except SpeedSettingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(text)
    return 0


main = command(parse_args, run)

if __name__ == "__main__":
    sys.exit(main())
