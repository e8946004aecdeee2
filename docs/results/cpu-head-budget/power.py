# As run for README.md (python power.py RUN 1024 0.3 POWER ...): a measurement script; the library form is
# training/calibration.SENSITIVITY_POWER.
"""The per-head sensitivity budget's power, chosen on training text: StreamingLLM's tiles under ρ_(l,h) ∝ s^power
on 8 windows of wiki.valid.tokens that the sensitivities (heads.jsonl, the first 2 windows) did not see; the
test text only scores the power chosen."""
import json
import sys
from pathlib import Path

import numpy as np

from llama_surgery_jax.evaluation.block_quality import BudgetScorer
from llama_surgery_jax.io import corpora
from llama_surgery_jax.model.checkpoint import load_model, load_tokenizer
from llama_surgery_jax.model.embedded import default_model_dir
from llama_surgery_jax.surgery.block_routing import floor_density
from llama_surgery_jax.training import calibration
from llama_surgery_jax.training.checkpoints import load_trained_routers

run, context, rho = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
powers = [float(p) for p in sys.argv[4:]]
model = load_model(default_model_dir())
model, router, _ = load_trained_routers(model, run)
tok = load_tokenizer(default_model_dir())
valid = corpora.windows(corpora.tokenize(tok, corpora.load_text("valid", None, "tokens")), context, 10)[2:]
test = corpora.windows(corpora.tokenize(tok, corpora.wikitext("test").text), context, 8)
head_s = np.asarray(json.loads(Path(__file__).with_name("heads.jsonl").read_text().splitlines()[0])["head"])
floor = floor_density(-(-context // router.block_size), tile=router.block_size, window=router.window, sink=router.sink)
scorer = BudgetScorer(model)
weights = np.maximum(head_s, head_s[head_s > 0].min())
scores = {}
for power in powers:
    table = calibration.renormalised(weights ** power, rho, floor)
    scores[power] = scorer(valid, table, "recent", 2)["ppl"]
    print(json.dumps({"power": power, "text": "valid windows 2-9", "ppl": scores[power]}), flush=True)
best = min(scores, key=scores.get)
table = calibration.renormalised(weights ** best, rho, floor)
print(json.dumps({"power": best, "text": "test windows 0-7", "ppl": scorer(test, table, "recent", 2)["ppl"]}),
      flush=True)
