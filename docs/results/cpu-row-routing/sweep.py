"""Perplexity of a block-mode run under several selections and row_front values, on CPU (as run: see README.md).

    python docs/results/cpu-row-routing/sweep.py RUN CONTEXT WINDOWS RHO SELECTION:FRONT [...]
"""

import dataclasses
import json
import sys

import numpy as np

from llama_surgery_jax.evaluation.block_quality import BudgetScorer
from llama_surgery_jax.io import corpora
from llama_surgery_jax.model.checkpoint import load_model, load_tokenizer
from llama_surgery_jax.model.embedded import default_model_dir
from llama_surgery_jax.surgery.routed_attention import routed_layers
from llama_surgery_jax.training.checkpoints import load_trained_routers

run, context, windows, rho = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
model = load_model(default_model_dir())
model, router, _ = load_trained_routers(model, run)
ids = corpora.tokenize(load_tokenizer(default_model_dir()), corpora.wikitext("test").text)
tokens = corpora.windows(ids, context, windows)
layers, heads = model.config.num_hidden_layers, model.config.num_key_value_heads
for spec in sys.argv[5:]:
    selection, front = spec.split(":")
    for impl in routed_layers(model):
        impl.config = dataclasses.replace(impl.config, row_front=float(front))
    scored = BudgetScorer(model)(tokens, np.full((layers, heads), rho, np.float32), selection, 2)
    print(json.dumps({"selection": selection, "row_front": float(front), "ppl": scored["ppl"],
                      "block_density": scored["block_density"]["mean"],
                      "recall": scored["attention_recall"]["mean"]}), flush=True)
