# As run for README.md (python heads.py RUN 1024 0.3 SEQUENCES): a measurement script; the library form is
# training/calibration.
"""Per-head budgets on CPU: sensitivity measured on valid text (the training corpus), scored on test windows."""
import json
import sys

import numpy as np

from llama_surgery_jax.evaluation.block_quality import BudgetScorer
from llama_surgery_jax.io import corpora
from llama_surgery_jax.model.checkpoint import load_model, load_tokenizer
from llama_surgery_jax.model.embedded import default_model_dir
from llama_surgery_jax.surgery.block_routing import floor_density
from llama_surgery_jax.training import calibration
from llama_surgery_jax.training.checkpoints import load_trained_routers

run, context, rho, sequences = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
model = load_model(default_model_dir())
model, router, _ = load_trained_routers(model, run)
tok = load_tokenizer(default_model_dir())
test = corpora.windows(corpora.tokenize(tok, corpora.wikitext("test").text), context, 8)
valid = corpora.windows(corpora.tokenize(tok, corpora.load_text("valid", None, "tokens")), context, sequences)
L, H = model.config.num_hidden_layers, model.config.num_key_value_heads
scorer = BudgetScorer(model)


def log_ppl(table):
    return np.log(scorer(valid, table, "recent", 2)["ppl"])



base = log_ppl(np.ones((L, H), np.float32))
layer_s = np.zeros(L)
head_s = np.zeros((L, H))
for layer in range(L):
    t = np.ones((L, H), np.float32)
    t[layer] = rho
    layer_s[layer] = log_ppl(t) - base
    for h in range(H):
        t = np.ones((L, H), np.float32)
        t[layer, h] = rho
        head_s[layer, h] = log_ppl(t) - base
print(json.dumps({"layer": layer_s.tolist(), "head": head_s.tolist()}), flush=True)
n = -(-context // router.block_size)
floor = floor_density(n, tile=router.block_size, window=router.window, sink=router.sink)


def positive(s):
    return np.maximum(s, s[s > 0].min())



adaptive = calibration.densities_at(calibration.read(run), rho)  # [L, H] mass-ranked shares
within = adaptive / adaptive.mean(axis=1, keepdims=True)
variants = {
    "layer sqrt(s_l)": np.repeat(np.sqrt(positive(layer_s))[:, None], H, 1),
    "head sqrt(s_lh)": np.sqrt(positive(head_s)),
    "head s_lh": positive(head_s),
    "layer sqrt(s_l) x head mass share": np.sqrt(positive(layer_s))[:, None] * within,
    "layer sqrt(s_l) x head sqrt(s_lh) share": np.sqrt(positive(layer_s))[:, None]
        * np.sqrt(positive(head_s)) / np.sqrt(positive(head_s)).mean(axis=1, keepdims=True),
}
for name, weights in variants.items():
    table = calibration.renormalised(weights, rho, floor)
    for sel in ("recent", "router"):
        s = scorer(test, table, sel, 2)
        print(json.dumps({"budget": name, "selection": sel, "ppl": s["ppl"], "density": s["block_density"]["mean"],
                          "table": table.round(3).tolist()}), flush=True)
