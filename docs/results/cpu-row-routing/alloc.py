# As run for the allocation table of README.md (python alloc.py RUN 1024 0.3): a throwaway measurement script;
# the library form is training/calibration.layer_sensitivity and sensitivity_densities.
"""Layer-sensitivity allocation on CPU: sensitivity on valid text, evaluation on test windows."""
import json, sys
import numpy as np
from llama_surgery_jax.io import corpora
from llama_surgery_jax.evaluation.block_quality import BudgetScorer
from llama_surgery_jax.model.checkpoint import load_model, load_tokenizer
from llama_surgery_jax.model.embedded import default_model_dir
from llama_surgery_jax.surgery.block_routing import floor_density
from llama_surgery_jax.training.checkpoints import load_trained_routers

run, context, rho = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
model = load_model(default_model_dir())
model, router, _ = load_trained_routers(model, run)
tok = load_tokenizer(default_model_dir())
test = corpora.windows(corpora.tokenize(tok, corpora.wikitext("test").text), context, 8)
valid = corpora.windows(corpora.tokenize(tok, corpora.load_text("valid", None, "tokens")), context, 4)
L, H = model.config.num_hidden_layers, model.config.num_key_value_heads
scorer = BudgetScorer(model)
base = scorer(valid, np.ones((L, H), np.float32), "recent", 2)["ppl"]
sens = []
for l in range(L):
    t = np.ones((L, H), np.float32); t[l] = rho
    sens.append(np.log(scorer(valid, t, "recent", 2)["ppl"] / base))
sens = np.maximum(np.asarray(sens), 1e-6)
print(json.dumps({"sensitivity": sens.tolist()}), flush=True)
n = -(-context // router.block_size)
floor = floor_density(n, tile=router.block_size, window=router.window, sink=router.sink)
def allocate(weights):
    d = np.full(L, rho)
    for _ in range(50):
        free = (d > floor + 1e-9) & (d < 1 - 1e-9)
        d = np.clip(rho * L * weights / weights.sum(), floor, 1.0)
        # renormalise the unclipped layers so the mean is rho
        for _ in range(50):
            gap = rho * L - d.sum()
            inside = (d > floor) & (d < 1.0)
            if abs(gap) < 1e-6 or not inside.any(): break
            d[inside] = np.clip(d[inside] + gap * weights[inside] / weights[inside].sum(), floor, 1.0)
    return d
for alpha in (0.5, 1.0):
    d = allocate(sens ** alpha)
    table = np.repeat(d[:, None], H, 1).astype(np.float32)
    for sel in ("recent", "router"):
        s = scorer(test, table, sel, 2)
        print(json.dumps({"alpha": alpha, "selection": sel, "ppl": s["ppl"], "density": s["block_density"]["mean"],
                          "layers": d.round(3).tolist()}), flush=True)
