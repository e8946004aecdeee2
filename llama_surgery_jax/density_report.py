"""Token and block density of the hard mask on a real model and text (METHOD.md §9, §10).

    python -m llama_surgery_jax.density_report [--model DIR] [--data-dir DIR] [--tokens 2048] [--json FILE]

For p ∈ {2, 3, 5, 7} (L = ceil(log_p 8192)) and every d_max, with routers at their homotopy
initialisation and with random route heads (`init_router_params(homotopy=False)`, seed 0), it routes
each layer's attention input of the dense model on the first `--tokens` tokens of wiki.valid.tokens
(no BOS) and reports, averaged over layers and routing heads (window and sink as in RouterConfig):

    token density      visible causal pairs / causal pairs
    tile T, original   computed causal tiles / causal tiles: the tile OR of the token mask
    tile T, sorted     tokens sorted by (code, position) per head: bucket-pass tiles (equal codes, in
                       sorted order) + band-pass tiles (window and sink pairs whose codes differ, in
                       original order), over causal tiles; each pair is computed by exactly one pass
    block mode         the block-level router (routes from pooled causal block features, block = tile)

At initialisation the router is dense, so its rows read 1.0 everywhere. The routes are computed on the
dense model's activations (identical to the surgery's at initialisation).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax.numpy as jnp

from llama_surgery_jax.cli.arguments import command, integer, output_file
from llama_surgery_jax.evaluation.density import (
    HEADER,
    report,
)
from llama_surgery_jax.surgery.config import RouterConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The settings, each checked (a bad one exits with status 2 and a message that names it)."""
    parser = argparse.ArgumentParser(description="Token and block density of the surgery's hard mask on "
                                     "WikiText-2 (wiki.valid.tokens) for p in {2,3,5,7} and every d_max.")
    parser.add_argument("--model", help="converted model folder (default: the embedded SmolLM2-135M)")
    parser.add_argument("--data-dir", help="WikiText-2 folder (default: $WIKITEXT2_DIR, else datasets)")
    parser.add_argument("--tokens", type=integer(2), default=2048, help="sequence length (the first window)")
    parser.add_argument("--routing-heads", default="query", choices=["query", "kv"])
    parser.add_argument("--seed", type=int, default=0, help="seed of the random router weights")
    parser.add_argument("--json", type=output_file, help="write the rows here (its path checked before the work)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    from llama_surgery_jax.io import corpora
    from llama_surgery_jax.model.checkpoint import CheckpointError, load_model, load_tokenizer
    from llama_surgery_jax.model.embedded import default_model_dir

    try:
        model_dir = Path(args.model) if args.model else default_model_dir()
        model = load_model(model_dir)
        ids = corpora.tokenize(load_tokenizer(model_dir), corpora.load_text("valid", args.data_dir, "tokens"))
        tokens = jnp.asarray(corpora.windows(ids, args.tokens, 1))
    except (CheckpointError, corpora.DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    window, sink = RouterConfig().window, RouterConfig().sink
    print(f"{model_dir.name}: {args.tokens} tokens of wiki.valid.tokens, "
          f"routing per {args.routing_heads} head, window {window}, sink {sink}, "
          f"means over {model.config.num_hidden_layers} layers and heads")
    print(HEADER)
    rows = report(model, tokens, routing_heads=args.routing_heads, seed=args.seed)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": str(model_dir), "tokens": args.tokens,
                                               "routing_heads": args.routing_heads, "window": window,
                                               "sink": sink, "rows": rows}, indent=1))
    return 0


main = command(parse_args, run)

if __name__ == "__main__":
    sys.exit(main())
