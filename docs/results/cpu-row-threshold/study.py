# As run for README.md (python study.py RUN CONTEXT WINDOWS RHO SPEC...): a measurement script, not library code.
"""Per-row thresholds under the prefix union: the row-routing analogue of the global oracle.

Each row scores every causal key block (its own dense mass for `row_oracle`, Quest's bound for `row_bound`, the
trained row router's softmax over the candidates for `router`). A tile (query block, key block) is executed when
some row of the block scores the key block at least τ, from the first such row on (rows above it masked inside the
tile): row i sees the tiles its block's rows ≤ i reached, so with τ fixed the rule is exactly causal.

SPEC = SELECTION/SCOPE/TAU[/BUDGET]:
  SELECTION  router, row_oracle, row_bound; row_oracle_share: the true mass as a share of the candidates' mass (what
             a router distilled with router.row_share_of=candidates predicts); row_oracle_off: as a share of the mass
             on the key blocks before the row's own (router.row_share_of=earlier_blocks)
  SCOPE  layer: one τ per layer; head: one τ per (layer, head)
  TAU    window: τ set per sequence so that the layer (head) executes as many tiles as its budgets (the global
                 oracle's accounting; the ceiling of a calibrated τ, not causal)
         fixed:  τ calibrated on WINDOWS windows of the training text (wiki.valid.tokens) so that their pooled
                 executed tiles are the budgets' (exactly causal; the test windows' density then varies)
  BUDGET uniform (default) or sensitivity: the per-(layer, head) densities whose tile totals τ is set to
  WEIGHT (optional) "weighted": each head's scores times its measured sensitivity s_(l,h) (the run's calibration),
         so that one τ per layer compares the expected cost of a miss, not the mass alone
"""
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from llama_surgery_jax.evaluation.block_quality import BudgetScorer, density_table
from llama_surgery_jax.io import corpora
from llama_surgery_jax.model.checkpoint import load_model, load_tokenizer
from llama_surgery_jax.model.embedded import default_model_dir
from llama_surgery_jax.surgery import block_routing as br
from llama_surgery_jax.surgery.mask import band_tiles, causal_tiles
from llama_surgery_jax.training import calibration
from llama_surgery_jax.training.checkpoints import load_trained_routers

run, context, windows, rhos, specs = (sys.argv[1], int(sys.argv[2]), int(sys.argv[3]),
                                      [float(x) for x in sys.argv[4].split(",")], sys.argv[5:])
model, router, _ = load_trained_routers(load_model(default_model_dir()), run)
calibrated = calibration.read(Path(run))
tok = load_tokenizer(default_model_dir())
test = corpora.windows(corpora.tokenize(tok, corpora.wikitext("test").text), context, windows)
valid = corpora.windows(corpora.tokenize(tok, corpora.wikitext("valid", release="tokens").text), context, windows)
L = model.config.num_hidden_layers
select_rows = br.select_rows
STATE = {"scope": "layer", "tau": "window", "layer": 0, "fixed": None, "peaks": {}, "extra": {}}


def threshold_rows(row_scores, budgets, *, t, tile, window, sink, front):
    """first_rows [b, h, n, n] of the per-row threshold rule."""
    layer = STATE["layer"] % L
    STATE["layer"] += 1
    b, h, _, n = row_scores.shape
    forced = band_tiles(n, tile=tile, window=window, sink=sink)
    candidate = causal_tiles(n, n) & ~forced
    real = (jnp.arange(n)[:, None] * tile + jnp.arange(tile)[None, :]) < t
    by_row = jnp.pad(row_scores, ((0, 0), (0, 0), (0, n * tile - t), (0, 0))).reshape(b, h, n, tile, n)
    if STATE["softmax"]:  # the router's scores are logits: each row's predicted share of its candidates' mass
        by_row = jax.nn.softmax(jnp.where(candidate[None, None, :, None, :], by_row, -jnp.inf), axis=-1)
    if STATE.get("off"):  # true mass as a share of the mass before the row's own block (sink and window included)
        off = causal_tiles(n, n) & ~jnp.eye(n, dtype=bool)
        by_row = jnp.where(off[None, None, :, None, :], by_row, 0.0)
        by_row = by_row / jnp.maximum(jnp.sum(by_row, axis=-1, keepdims=True), 1e-30)
    if STATE.get("share"):  # true mass as a share of the candidates' mass (what the router is trained to predict)
        by_row = jnp.where(candidate[None, None, :, None, :], by_row, 0.0)
        by_row = by_row / jnp.maximum(jnp.sum(by_row, axis=-1, keepdims=True), 1e-30)
    if STATE["weight"] is not None:
        by_row = by_row * jnp.asarray(STATE["weight"][layer], jnp.float32)[None, :, None, None, None]
    by_row = jnp.where(real[None, None, :, :, None] & candidate[None, None, :, None, :], by_row, -jnp.inf)
    peak = jnp.max(by_row, axis=3)  # [b, h, n, n]: the best any row of the block scores each key block
    extra = budgets - jnp.sum(forced, axis=-1, dtype=jnp.int32)[None, :]  # [h, n]
    per_head = STATE["scope"] == "head"
    if STATE["tau"] == "record":
        def record(p, e, layer=layer):
            STATE["peaks"].setdefault(layer, []).append(np.asarray(p))
            STATE["extra"][layer] = np.asarray(e)

        jax.debug.callback(record, peak, jnp.sum(extra, axis=-1), ordered=True)
    if STATE["tau"] == "fixed":
        tau = jnp.asarray(STATE["fixed"][layer], jnp.float32)  # [h] or []
        tau = tau[None, :, None, None, None] if per_head else tau
    else:
        flat = peak.reshape(b, h, -1) if per_head else peak.reshape(b, 1, -1)
        k = jnp.sum(extra, axis=-1) if per_head else jnp.sum(extra)[None]
        ordered = -jnp.sort(-flat, axis=-1)
        tau = jnp.take_along_axis(ordered, jnp.maximum(k - 1, 0)[None, :, None], axis=-1)[..., None, None]
    hit = by_row >= tau
    first = jnp.where(jnp.any(hit, axis=3), jnp.argmax(hit, axis=3), tile).astype(jnp.int32)
    first = jnp.where(candidate & (peak > -jnp.inf), first, tile)
    return jnp.where(forced, 0, first)


def calibrate(selection: str, table, per_head: bool) -> dict:
    """τ per layer (per head) from the valid windows: the k-th largest pooled peak, k their budgets' total."""
    STATE.update(tau="record", peaks={}, extra={}, layer=0)
    BudgetScorer(model)(valid, table, selection, 2)
    fixed = {}
    for layer, peaks in STATE["peaks"].items():
        peaks = np.concatenate(peaks, axis=0)  # [windows, h, n, n]
        count = peaks.shape[0]
        if per_head:
            fixed[layer] = [float(np.sort(peaks[:, head].ravel())[::-1][max(count * int(k) - 1, 0)])
                            for head, k in enumerate(STATE["extra"][layer])]
        else:
            fixed[layer] = float(np.sort(peaks.ravel())[::-1][max(count * int(STATE["extra"][layer].sum()) - 1, 0)])
    return fixed


for rho in rhos:
    for spec in specs:
        parts = spec.split("/")
        selection = parts[0]
        scope, tau, budget, weight = (parts + ["", "", "uniform", ""])[1:5] if len(parts) > 1 else ("", "", "", "")
        budget = budget or "uniform"
        STATE["weight"] = (np.asarray(calibrated["head_sensitivity"], np.float32) if weight == "weighted" else None)
        table = density_table(model, router, calibrated, rho, budget, context)
        off, share = selection.endswith("_off"), selection.endswith("_share")
        selection = selection.removesuffix("_off").removesuffix("_share")
        STATE.update(scope=scope, softmax=selection == "router", share=share, off=off, layer=0)
        if scope:
            br.select_rows = threshold_rows
            if tau == "fixed":
                STATE["fixed"] = calibrate(selection, table, scope == "head")
            STATE.update(tau=tau, layer=0)
        scored = BudgetScorer(model)(test, table, selection, 2)
        br.select_rows = select_rows
        print(json.dumps({"rho": rho, "row": spec, "ppl": round(scored["ppl"], 4),
                          "density": round(scored["block_density"]["mean"], 4),
                          "spread": [round(scored["block_density"]["min"], 4), round(scored["block_density"]["max"], 4)],
                          "recall": scored.get("attention_recall", {}).get("mean")}), flush=True)
