"""Perplexity on WikiText-2 test or your own text: dense, with the surgery's routers, or a baseline; and needle
retrieval.

    python -m llama_surgery_jax.evaluate [--model CONVERTED_DIR] [--data-dir DIR] [--context 1024]
                                         [--max-windows N] [--surgery init|CHECKPOINT] [--json FILE]
                                         [--contexts 1024,4096,8192] [--dense-too]
                                         [--baseline streaming|moba --baseline-density D]
                                         [--niah 2048,4096,8192 [--niah-trials N]] [--text FILE|DIR]
                                         [--block-density RHO [--budget adaptive|uniform]
                                          [--selection router|recent|moba|oracle|global_oracle]]

`--contexts` scores several contexts in one run (the JSON's top-level fields are the first one's, every
context under `by_context`); `--dense-too` also scores the dense model on the same windows (`dense`,
`gap`); `--baseline` runs a static sink + local-window mask (streaming) or untrained MoBA-style block
gating at block density D instead of the routers (`baselines.py`); `--niah` adds needle-in-a-haystack
exact-match accuracy at those lengths (`niah.py`), for the model as configured and, with `--dense-too`,
dense. A block-mode run (budgeted block routing) is scored at `--block-density` ρ (default: the run's), with
its calibrated per-head densities or ρ for every head (`--budget`), and `--selection` puts a baseline or an
oracle in the router's place under the same budget; the JSON then holds the executed block density and the
attention recall per window and layer, and needles run by re-prefill. The full comparison with plots is
`python -m llama_surgery_jax.quality --run RUN`.

Protocol (stated in every result): the whole `wiki.test.raw` (or the `--text` file, or a folder's `*.txt`
files in name order joined by a blank line) is tokenized as one stream with no BOS, cut into non-overlapping
windows of `--context` tokens (stride = context, the tail that fills no window dropped); every token of a
window after its first is scored. ppl = exp(total NLL / scored tokens).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llama_surgery_jax import data
from llama_surgery_jax.evaluation.perplexity import (
    niah,
    perplexity,
    protocol,
    transformers_perplexity,
)
from llama_surgery_jax.files import write_json_atomic
from llama_surgery_jax.model.checkpoint import CheckpointError, load_model, load_tokenizer
from llama_surgery_jax.model.config import ConfigError, Precision
from llama_surgery_jax.model.embedded import default_model_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="WikiText-2 test (or your own text) perplexity of a converted "
                                                 "Llama.")
    parser.add_argument("--model", help="converted model folder (default: the embedded SmolLM2-135M)")
    parser.add_argument("--data-dir", help=f"WikiText-2 folder (default: ${data.DATA_DIR_ENV}, else datasets)")
    parser.add_argument("--text", metavar="FILE|DIR",
                        help="score this UTF-8 text instead of WikiText-2 test: a file, or a folder whose *.txt files "
                             "(not sub-folders') are read in name order, joined by a blank line")
    parser.add_argument("--context", type=int, default=1024, help="window length in tokens")
    parser.add_argument("--max-windows", type=int, help="score only the first N windows")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="parameter and compute dtype")
    parser.add_argument("--surgery", help="'init' (routers at their homotopy initialisation) or a "
                                          "router checkpoint folder written by train")
    parser.add_argument("--compare-transformers", action="store_true",
                        help="also score the same windows with transformers (torch) from the original source")
    parser.add_argument("--json", help="write the result here")
    parser.add_argument("--contexts", help="comma-separated window lengths, e.g. 1024,4096,8192 (overrides --context)")
    parser.add_argument("--dense-too", action="store_true", help="also score the dense model on the same windows")
    parser.add_argument("--baseline", choices=["streaming", "moba"], help="a baseline mask instead of routers")
    parser.add_argument("--baseline-density", type=float, default=0.5, help="the baseline's target block density")
    parser.add_argument("--baseline-tile", type=int, default=128, help="the baseline's block size in tokens")
    parser.add_argument("--block-density", type=float,
                        help="block-mode runs: the executed block density ρ (default: the run's router.block_density)")
    parser.add_argument("--budget", choices=["adaptive", "uniform"],
                        help="block-mode runs: per-head densities calibrated on training data (adaptive, the default "
                             "when the run has them) or ρ for every head")
    parser.add_argument("--selection", choices=["router", "recent", "moba", "oracle", "global_oracle"],
                        help="block-mode runs: which tiles fill the budget (default: the router); the others are "
                             "baselines under the same budget, the oracles upper bounds that read the dense attention")
    parser.add_argument("--allow-floor", action="store_true",
                        help="run a block density below the floor of the sink and window tiles (the floor executes)")
    parser.add_argument("--niah", help="comma-separated needle-in-a-haystack lengths in tokens, e.g. 2048,4096")
    parser.add_argument("--niah-trials", type=int, default=2, help="cases per (length, depth)")
    args = parser.parse_args(argv)
    contexts = [int(c) for c in args.contexts.split(",")] if args.contexts else [args.context]
    if args.baseline and (args.surgery or args.niah):
        print("error: --baseline replaces the routers and has no KV-cache decode: not with --surgery or --niah",
              file=sys.stderr)
        return 2

    try:
        from llama_surgery_jax.training.checkpoints import prepare_for_evaluation, trained_base

        if not args.model and args.surgery and args.surgery != "init":
            args.model = trained_base(args.surgery)  # the run's own base model, when it is here
        model_dir = Path(args.model) if args.model else default_model_dir()
        model = load_model(model_dir, Precision(args.dtype, args.dtype))
        tokenizer = load_tokenizer(model_dir)
        corpus = data.load_corpus(args.text, "test", args.data_dir, "raw")
        ids = data.tokenize(tokenizer, corpus.text)
        setting = "--contexts" if args.contexts else "--context"
        windows_by_context = {c: data.windows(ids, c, args.max_windows, source=data.describe(corpus.source),
                                              setting=setting) for c in contexts}
        token_windows = windows_by_context[contexts[0]]
        attention_kwargs = {}
        if args.surgery:
            model, attention_kwargs = prepare_for_evaluation(model, args.surgery, context=max(contexts),
                                                             model_dir=model_dir, block_density=args.block_density,
                                                             budget=args.budget, selection=args.selection)
        elif args.block_density is not None or args.budget or args.selection:
            raise CheckpointError("--block-density, --budget and --selection need --surgery RUN of a block-mode run")
        if "block_density" in attention_kwargs and not args.allow_floor:
            check_above_floor(model, attention_kwargs, contexts)
    except (CheckpointError, ConfigError, data.DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    by_context = []
    for context, windows_here in windows_by_context.items():
        if args.baseline:
            from llama_surgery_jax.surgery.baselines import describe, extra_blocks_for_density, install_baseline

            extra = extra_blocks_for_density(-(-context // args.baseline_tile), args.baseline_density)
            install_baseline(model, args.baseline, extra=extra, tile=args.baseline_tile)
        scored = perplexity(model, windows_here, batch_size=args.batch_size, **attention_kwargs)
        scored.update(context=context, protocol=protocol(context, len(windows_here), corpus.source))
        if args.baseline:
            scored["baseline"] = describe(args.baseline, extra, args.baseline_tile, context)
        by_context.append(scored)
    result = dict(by_context[0])
    result.update(model=str(model_dir), dtype=args.dtype, surgery=args.surgery or "none")
    if args.contexts:
        result["by_context"] = by_context
    if args.niah:
        result["niah"] = niah(model, tokenizer, args, **attention_kwargs)
    if args.dense_too:
        from llama_surgery_jax.surgery.routed_attention import remove_routers

        remove_routers(model)
        for row in by_context:
            row["dense"] = perplexity(model, windows_by_context[row["context"]], batch_size=args.batch_size)
            row["gap"] = row["ppl"] / row["dense"]["ppl"] - 1
            print(f"context {row['context']}: perplexity {row['ppl']:.4f}, dense {row['dense']['ppl']:.4f} "
                  f"({100 * row['gap']:+.2f} %)")
        result.update(dense=by_context[0]["dense"], gap=by_context[0]["gap"])
        if args.niah:
            result["niah_dense"] = niah(model, tokenizer, args)
    if args.compare_transformers:
        reference = transformers_perplexity(model_dir, token_windows)
        result["transformers"] = reference | {"relative_difference": result["ppl"] / reference["ppl"] - 1}
        print(f"transformers perplexity {reference['ppl']:.4f} on the same windows "
              f"(ours/theirs - 1 = {result['transformers']['relative_difference']:+.2e})")
    scored_text = f"text {data.describe(corpus.source)}" if args.text else "wikitext-2 test"
    for row in by_context:
        label = f"baseline={args.baseline}" if args.baseline else f"surgery={result['surgery']}"
        print(f"{scored_text} perplexity {row['ppl']:.4f} over {row['tokens']} tokens "
              f"({row['protocol']['windows']} windows of {row['context']}, no BOS, {label})")
    if args.niah:
        from llama_surgery_jax.evaluation.niah import table

        print(table({"model": result["niah"], **({"dense": result["niah_dense"]} if args.dense_too else {})}))
    if args.json:
        write_json_atomic(args.json, result)
    return 0


def check_above_floor(model, attention_kwargs: dict, contexts: list[int]) -> None:
    """A block density below what the sink and window tiles alone execute is refused (it cannot be honoured)."""
    import numpy as np

    from llama_surgery_jax.surgery.block_routing import floor_density
    from llama_surgery_jax.surgery.routed_attention import routed_layers

    config = routed_layers(model)[0].config
    rho = float(np.mean(attention_kwargs["block_density"]))
    for context in contexts:
        n = -(-context // config.block_size)
        floor = floor_density(n, tile=config.block_size, window=config.window, sink=config.sink)
        if rho < floor:
            raise CheckpointError(
                f"block density {rho:.3f} is below the floor {floor:.3f} at context {context} (tile "
                f"{config.block_size}, window {config.window}: the sink, own and window tiles alone execute that "
                "much): raise --block-density, use a longer context, or pass --allow-floor to run the floor")


if __name__ == "__main__":
    sys.exit(main())
