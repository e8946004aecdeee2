"""Quality against density for a trained surgery run: one script, one folder of tables and plots.

    python -m llama_surgery_jax.quality --run RUN_DIR [--model DIR] [--data-dir DIR] [--out DIR]
        [--contexts 1024,4096,8192] [--windows 8] [--curve-context 1024] [--curve-windows 8]
        [--d-max 2,3,4,5,6,7] [--window-sweep 0,32,64,128,256] [--baseline-extra 0,1,2,3,4,6]
        [--niah-lengths 2048,4096,8192] [--niah-depths 0,0.25,0.5,0.75,1] [--niah-trials 2]
        [--speed-contexts 1024,4096,8192] [--speed-new-tokens 64]
        [--ablate-p 2,3,5,7 --ablate-steps 200 --ablate-preset default] [--text FILE|DIR]

Writes OUT/quality.json, OUT/quality.md (every table), OUT/quality_density.png (the curve),
OUT/density_heatmap.png (per layer × head densities), OUT/tree_path.png (one token's route). Sections
(each skipped by giving an empty list, e.g. `--niah-lengths ""`, or `--curve-windows 0`; a section
not run keeps the results an earlier run wrote into the same OUT/quality.json, so the work can be split
into several shorter commands):

  perplexity   WikiText-2 test (or the `--text` file or folder, which the curve, the ablation's evaluation and
               the speed prompts use too) at each context: dense, surgery, streaming and MoBA baselines at the
               surgery's own block density (sorted, tile = block_size, measured on the first window),
               the evaluate.py protocol (no BOS, stride = context, all tokens after a window's first).
  curve        at --curve-context: surgery with d_max and W changed at evaluation time (the trained
               routers' choices are kept; a larger d_max compares fewer prefix levels), the baselines
               at several `extra` blocks, dense at 1.0; x = block density (sorted, tile = block_size).
  niah         needle-in-a-haystack exact-match accuracy, dense vs surgery (`niah.py`); the filler is always
               WikiText-2 valid.
  speed        prefill and decode tokens/s, dense (cuDNN via jax.nn.dot_product_attention) vs surgery
               (block-sparse kernel prefill; decode gathering visible keys, and masked over the cache),
               batch 1, compilation excluded, in --speed-dtype.
  ablation     routers trained per tree arity p (L = ceil(log_p seq_len), d_max = L // 2, else the
               preset), each evaluated like the curve's surgery point.

Routes are the argmax (no noise), the hard mask; WikiText-2 test is only evaluated on, never tuned on.
"""

from __future__ import annotations

import argparse
import sys

from llama_surgery_jax.cli.arguments import command, density, integer, listed, output_folder, real
from llama_surgery_jax.evaluation.block_quality import ROWS, pick_row
from llama_surgery_jax.evaluation.quality_report import run_quality
from llama_surgery_jax.io import corpora
from llama_surgery_jax.model.checkpoint import CheckpointError
from llama_surgery_jax.model.config import ConfigError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The settings, each checked (a bad one exits with status 2 and a message that names it)."""
    parser = argparse.ArgumentParser(description="Quality against density of a trained surgery run "
                                                 "(perplexity, curve, NIAH, speed, p ablation).")
    parser.add_argument("--run", required=True, help="training run folder (its router checkpoints)")
    parser.add_argument("--model", help="converted model folder (default: the embedded SmolLM2-135M)")
    parser.add_argument("--data-dir", help=f"WikiText-2 folder (default: ${corpora.DATA_DIR_ENV})")
    parser.add_argument("--text", metavar="FILE|DIR",
                        help="score this UTF-8 text instead of WikiText-2 test: a file, or a folder whose *.txt files "
                             "(not sub-folders') are read in name order; the NIAH filler stays WikiText-2 valid "
                             "(without WikiText-2, skip it: --niah-lengths '')")
    parser.add_argument("--out", type=output_folder, help="output folder (default: RUN/quality)")
    parser.add_argument("--contexts", type=listed(integer(2)), default=[1024, 4096, 8192])
    parser.add_argument("--windows", type=integer(1), default=8, help="windows per context of the perplexity table")
    parser.add_argument("--batch-size", type=integer(1), default=1)
    parser.add_argument("--curve-context", type=integer(2), default=1024)
    parser.add_argument("--curve-windows", type=integer(0), default=8)
    parser.add_argument("--d-max", type=listed(integer(1)), default=[2, 3, 4, 5, 6, 7],
                        help="evaluation-time d_max sweep")
    parser.add_argument("--window-sweep", type=listed(integer(0)), default=[0, 32, 64, 256],
                        help="evaluation-time W sweep")
    parser.add_argument("--baseline-extra", type=listed(integer(0)), default=[0, 1, 2, 3, 4, 5, 6],
                        help="extra blocks of the baselines on the curve")
    parser.add_argument("--niah-lengths", type=listed(integer(2)), default=[2048, 4096, 8192])
    parser.add_argument("--niah-depths", type=listed(real(0.0, 1.0)), default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--niah-trials", type=integer(1), default=2)
    parser.add_argument("--speed-contexts", type=listed(integer(2)), default=[1024, 4096, 8192])
    parser.add_argument("--speed-new-tokens", type=integer(1), default=64)
    parser.add_argument("--speed-dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--ablate-p", type=listed(integer(2)), default=[], help="e.g. 2,3,5,7: train routers per p")
    parser.add_argument("--ablate-steps", type=integer(1), help="training steps per p (default: the preset's)")
    parser.add_argument("--ablate-preset", default="default")
    parser.add_argument("--ablate-override", action="append", default=[], help="key=value for each p's training")
    parser.add_argument("--route-token", type=integer(0), default=512, help="the token whose tree path is drawn")
    parser.add_argument("--rows", type=listed(block_row), default=list(ROWS),
                        help="block-mode runs: the table's rows as selection/budget, e.g. router/sensitivity,"
                             "recent/sensitivity (default: every row)")
    parser.add_argument("--densities", type=listed(density), default=[0.1, 0.2, 0.3],
                        help="block-mode runs: the executed block densities of the table")
    parser.add_argument("--windows-at", type=context_counts, default=[],
                        help="block-mode runs: windows per context, e.g. 8192:all,1024:8 (else --windows)")
    parser.add_argument("--router-cost", type=real(0.0, 1.0), default=0.0,
                        help="block-mode runs: time the router's share of a forward at this ρ (0: skip)")
    parser.add_argument("--niah-oracle-density", type=real(0.0, 1.0), default=0.2,
                        help="block-mode runs: the uniform oracle's needle row at this ρ (0: none)")
    parser.add_argument("--niah-densities", type=listed(density), default=[0.2, 0.3],
                        help="block-mode runs: the densities of the needle rows")
    parser.add_argument("--niah-thresholds", action="store_true",
                        help="row-routing runs (router.query=row): the router's needle rows spend their budget by "
                             "per-row thresholds, τ calibrated at each needle length on the training text")
    args = parser.parse_args(argv)
    return args


def block_row(text: str) -> tuple[str, str, str]:
    try:
        return pick_row(text.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def run(args: argparse.Namespace) -> int:
    try:
        run_quality(args)
    except (CheckpointError, ConfigError, corpora.DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def context_counts(text: str) -> list[tuple[int, int | None]]:
    """'8192:36,1024:8' → [(8192, 36), (1024, 8)]; 'all' for every window of the text."""
    pairs = []
    for item in filter(None, text.split(",")):
        context, _, count = item.partition(":")
        pairs.append((int(context), None if count == "all" else int(count)))
    return pairs


main = command(parse_args, run)

if __name__ == "__main__":
    sys.exit(main())
