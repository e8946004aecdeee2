# As run for README.md (python alloc.py RUN 1024 RHO...): a measurement script, not library code.
"""Where the global oracle's gain comes from: its allocation (how many tiles each head and query block gets) or its
ranking (which tiles). Each variant replaces the global oracle's tile rule for one scoring pass:

    global oracle          the layer's tiles (the budgets' total) on the heaviest candidates of any head and row
    global counts, recent  as many tiles per (head, query block) as the global oracle gives it, the most recent ones
    lagged counts, recent  query block r gets block r − 1's global-oracle count (at most its candidates), the most
                           recent ones: the count from the previous block (the global threshold still sees the
                           whole sequence, so this is not exactly causal; it bounds what a count predicted from the
                           previous block could do)
    uniform counts, recent StreamingLLM (the `recent` selection), for scale
"""
import json
import sys

import jax.numpy as jnp
import numpy as np

from llama_surgery_jax.evaluation.block_quality import BudgetScorer
from llama_surgery_jax.io import corpora
from llama_surgery_jax.model.checkpoint import load_model, load_tokenizer
from llama_surgery_jax.model.embedded import default_model_dir
from llama_surgery_jax.surgery import block_routing as br
from llama_surgery_jax.surgery.mask import band_tiles, causal_tiles
from llama_surgery_jax.training.checkpoints import load_trained_routers

run, context, densities = sys.argv[1], int(sys.argv[2]), [float(x) for x in sys.argv[3:]]
model, router, _ = load_trained_routers(load_model(default_model_dir()), run)
tok = load_tokenizer(default_model_dir())
test = corpora.windows(corpora.tokenize(tok, corpora.wikitext("test").text), context, 8)
L, H = model.config.num_hidden_layers, model.config.num_key_value_heads
global_oracle = br.global_oracle_tiles


def recent_with_counts(counts, n, rule):
    """counts [b, h, n] tiles per (head, query block), forced included → the forced tiles plus the most recent
    candidates up to each count."""
    forced = band_tiles(n, **rule)
    candidate = causal_tiles(n, n) & ~forced
    extra = counts - jnp.sum(forced, axis=-1)[None, None, :]
    # rank of each candidate from the most recent (0) back
    from_recent = jnp.cumsum(candidate[..., ::-1], axis=-1)[..., ::-1] - 1
    return forced | (candidate & (from_recent < extra[..., None]))


def global_counts(mass, budgets, *, tile, window, sink):
    rule = dict(tile=tile, window=window, sink=sink)
    tiles = global_oracle(mass, budgets, **rule)
    return recent_with_counts(jnp.sum(tiles, axis=-1, dtype=jnp.int32), mass.shape[-1], rule)


def lagged_counts(mass, budgets, *, tile, window, sink):
    rule = dict(tile=tile, window=window, sink=sink)
    n = mass.shape[-1]
    counts = jnp.sum(global_oracle(mass, budgets, **rule), axis=-1, dtype=jnp.int32)  # [b, h, n]
    forced = jnp.sum(band_tiles(n, **rule), axis=-1, dtype=jnp.int32)
    extra = jnp.maximum(counts - forced[None, None, :], 0)
    lagged = jnp.concatenate([jnp.zeros_like(extra[..., :1]), extra[..., :-1]], axis=-1)
    return recent_with_counts(lagged + forced[None, None, :], n, rule)


variants = {"global oracle": global_oracle, "global counts, recent": global_counts,
            "lagged counts, recent": lagged_counts}
for rho in densities:
    table = np.full((L, H), rho, np.float32)
    scored = BudgetScorer(model)(test, table, "recent", 2)
    print(json.dumps({"rho": rho, "row": "StreamingLLM", "ppl": scored["ppl"],
                      "density": scored["block_density"]["mean"]}), flush=True)
    for name, rule in variants.items():
        br.global_oracle_tiles = rule  # the selection "global_oracle" reads it when it traces
        scored = BudgetScorer(model)(test, table, "global_oracle", 2)
        print(json.dumps({"rho": rho, "row": name, "ppl": scored["ppl"], "density": scored["block_density"]["mean"],
                          "recall": scored["attention_recall"]["mean"]}), flush=True)
    br.global_oracle_tiles = global_oracle
