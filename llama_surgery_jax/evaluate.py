"""Perplexity on WikiText-2 test or your own text: dense, with the surgery's routers, or a baseline; and needle
retrieval.

    python -m llama_surgery_jax.evaluate [--model CONVERTED_DIR] [--data-dir DIR] [--context 1024]
                                         [--max-windows N] [--surgery init|CHECKPOINT] [--json FILE]
                                         [--contexts 1024,4096,8192] [--dense-too]
                                         [--baseline streaming|moba --baseline-density D]
                                         [--niah 2048,4096,8192 [--niah-trials N]] [--text FILE|DIR]
                                         [--block-density RHO [--budget adaptive|sensitivity|uniform]
                                          [--selection router|recent|moba|oracle|global_oracle|row_bound|...]
                                          [--thresholds]]

`--contexts` scores several contexts in one run (the JSON's top-level fields are the first one's, every
context under `by_context`); `--dense-too` also scores the dense model on the same windows (`dense`,
`gap`); `--baseline` runs a static sink + local-window mask (streaming) or untrained MoBA-style block
gating at block density D instead of the routers (`baselines.py`); `--niah` adds needle-in-a-haystack
exact-match accuracy at those lengths (`niah.py`), for the model as configured and, with `--dense-too`,
dense. A block-mode run (budgeted block routing) is scored at `--block-density` ρ (default: the run's), with
its calibrated per-head densities or ρ for every head (`--budget`), and `--selection` puts a baseline or an
oracle in the router's place under the same budget; the JSON then holds the executed block density and the
attention recall per window and layer, and needles run by re-prefill. `--thresholds` spends the budget's tiles by
per-row thresholds instead of a count per query block (row selections: `row_bound`, `row_oracle`, `row_moba`, or
the router of a run trained with router.query=row): τ per layer is calibrated on 8 windows of the training text
(`wiki.valid.tokens`) at each context, and the executed density (per window, in the JSON) varies around
ρ. The full comparison with plots is
`python -m llama_surgery_jax.quality --run RUN`.

Protocol (stated in every result): the whole `wiki.test.raw` (or the `--text` file, or a folder's `*.txt`
files in name order joined by a blank line) is tokenized as one stream with no BOS, cut into non-overlapping
windows of `--context` tokens (stride = context, the tail that fills no window dropped); every token of a
window after its first is scored. ppl = exp(total NLL / scored tokens).
"""

from __future__ import annotations

import argparse
import sys

from llama_surgery_jax.cli.arguments import command, density, integer, listed, output_file, unchanged
from llama_surgery_jax.evaluation.scoring import run_evaluation
from llama_surgery_jax.io import corpora
from llama_surgery_jax.io.files import write_json_atomic
from llama_surgery_jax.model.checkpoint import CheckpointError
from llama_surgery_jax.model.config import ConfigError
from llama_surgery_jax.surgery.block_routing import SELECTIONS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The settings, each checked (a bad one exits with status 2 and a message that names it)."""
    parser = argparse.ArgumentParser(description="WikiText-2 test (or your own text) perplexity of a converted "
                                                 "Llama.")
    parser.add_argument("--model", help="converted model folder (default: the embedded SmolLM2-135M)")
    parser.add_argument("--data-dir", help=f"WikiText-2 folder (default: ${corpora.DATA_DIR_ENV}, else datasets)")
    parser.add_argument("--text", metavar="FILE|DIR",
                        help="score this UTF-8 text instead of WikiText-2 test: a file, or a folder whose *.txt files "
                             "(not sub-folders') are read in name order, joined by a blank line")
    parser.add_argument("--context", type=integer(2), default=1024, help="window length in tokens")
    parser.add_argument("--max-windows", type=integer(1), help="score only the first N windows")
    parser.add_argument("--batch-size", type=integer(1), default=1)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="parameter and compute dtype")
    parser.add_argument("--surgery", help="'init' (routers at their homotopy initialisation) or a "
                                          "router checkpoint folder written by train")
    parser.add_argument("--compare-transformers", action="store_true",
                        help="also score the same windows with transformers (torch) from the original source")
    parser.add_argument("--json", type=output_file, help="write the result here (its path checked before the work)")
    parser.add_argument("--contexts", type=listed(integer(2)),
                        help="comma-separated window lengths, e.g. 1024,4096,8192 (overrides --context)")
    parser.add_argument("--dense-too", action="store_true", help="also score the dense model on the same windows")
    parser.add_argument("--baseline", choices=["streaming", "moba"], help="a baseline mask instead of routers")
    parser.add_argument("--baseline-density", type=density, default=0.5, help="the baseline's target block density")
    parser.add_argument("--baseline-tile", type=integer(1), default=128, help="the baseline's block size in tokens")
    parser.add_argument("--block-density", type=density,
                        help="block-mode runs: the executed block density ρ (default: the run's router.block_density)")
    parser.add_argument("--budget", choices=["adaptive", "sensitivity", "uniform"],
                        help="block-mode runs: per-head densities calibrated on training data (adaptive, the default "
                             "when the run has them) or ρ for every head")
    parser.add_argument("--selection", choices=list(SELECTIONS),
                        help="block-mode runs: which tiles fill the budget (default: the router); the others are "
                             "baselines under the same budget, the oracles upper bounds that read the dense attention")
    parser.add_argument("--thresholds", action="store_true",
                        help="block-mode runs, row selections: per-row thresholds calibrated on training text spend "
                             "the budget's tiles (a block runs as many as its rows' predicted mass reaches)")
    parser.add_argument("--allow-floor", action="store_true",
                        help="run a block density below the floor of the sink and window tiles (the floor executes)")
    parser.add_argument("--niah", type=unchanged(listed(integer(2))),
                        help="comma-separated needle-in-a-haystack lengths in tokens, e.g. 2048,4096")
    parser.add_argument("--niah-trials", type=integer(1), default=2, help="cases per (length, depth)")
    args = parser.parse_args(argv)
    if args.baseline:
        check_baseline(parser, args)
    return args


def run(args: argparse.Namespace) -> int:
    if args.baseline and (args.surgery or args.niah):
        print("error: --baseline replaces the routers and has no KV-cache decode: not with --surgery or --niah",
              file=sys.stderr)
        return 2
    try:
        result, notes = run_evaluation(args)
    except (CheckpointError, ConfigError, corpora.DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in notes:
        print(line)
    if args.json:
        write_json_atomic(args.json, result)
    return 0


def check_baseline(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A baseline whose tile covers the whole window, or whose density rounds to every tile, runs dense: refused."""
    from llama_surgery_jax.surgery.baselines import baseline_block_density, extra_blocks_for_density

    for context in args.contexts or [args.context]:
        blocks = -(-context // args.baseline_tile)
        executed = baseline_block_density(blocks, extra_blocks_for_density(blocks, args.baseline_density))
        if args.baseline_density < 1 and executed >= 1:
            fix = "a smaller --baseline-tile (e.g. 32)" + (" or a lower --baseline-density" if blocks > 2 else "")
            parser.error(f"--baseline {args.baseline} at --baseline-density {args.baseline_density} runs dense at "
                         f"--context {context}: {blocks} block(s) of --baseline-tile {args.baseline_tile} tokens leave "
                         f"no tile to skip at that density; use {fix}")


main = command(parse_args, run)

if __name__ == "__main__":
    sys.exit(main())
