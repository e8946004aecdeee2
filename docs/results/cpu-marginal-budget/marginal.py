# As run for README.md (python marginal.py RUN 1024 OUT.jsonl 0.3 0.65): a measurement script; the library budget it is
# compared with is training/calibration.sensitivity_densities.
"""The curve ("marginal") budget against the linear per-head sensitivity budget, on CPU.

1. Curves: for every density d of the grid (the floor and the densities given), `calibration.head_sensitivity`
   at d on windows 0-1 of 1024 of wiki.valid.tokens (the windows of ../cpu-head-budget/heads.py): Δloss_(l,h)(d),
   head (l, h) alone running StreamingLLM's tiles at d, every other head dense. The floor of the length is one
   point, Δloss(1) = 0 another.
2. Allocation (`curve_allocation`): minimise Σ_h Δloss_h(d_h) over mean d_h = ρ, floor ≤ d_h ≤ 1, each head's loss
   taken as the lower convex hull of its points (piecewise linear), losses assumed additive across heads:
   from every head at the floor, the hull segments are bought in order of slope (the steepest fall of loss per
   unit of density first) until the budget is spent, the last one in part.
3. Scores: valid windows 2-9 (selection among budgets) and the first 8 test windows of wiki.test.raw (report
   only), StreamingLLM's tiles ("recent") and the oracle ("oracle"), under the curve, linear-sensitivity
   (s = Δloss at the run's ρ 0.3, the library's rule) and uniform budgets.
Each line of OUT is one JSON record; a rerun skips the curve densities already in OUT."""
import json
import sys
import time
from pathlib import Path

import numpy as np

from llama_surgery_jax.io import corpora as data  # llama_surgery_jax.data before db2bd06
from llama_surgery_jax.evaluation.block_quality import BudgetScorer
from llama_surgery_jax.model.checkpoint import load_model, load_tokenizer
from llama_surgery_jax.model.embedded import default_model_dir
from llama_surgery_jax.surgery.block_routing import floor_density
from llama_surgery_jax.training import calibration
from llama_surgery_jax.training.checkpoints import load_trained_routers


def lower_hull(points):
    """points [(d, loss)] with distinct d → the vertices of their lower convex hull, d ascending."""
    hull = []
    for p in sorted(points):
        while len(hull) >= 2 and ((hull[-1][0] - hull[-2][0]) * (p[1] - hull[-2][1])
                                  - (hull[-1][1] - hull[-2][1]) * (p[0] - hull[-2][0])) <= 0:
            hull.pop()  # hull[-1] lies on or above the chord hull[-2] → p
        hull.append(p)
    return hull


def curve_allocation(grid, losses, rho, floor):
    """grid [G] densities (the floor first, 1.0 last), losses [G, L, H] measured Δloss at each → float32 densities
    [L, H] with mean ρ, each ≥ the floor, minimising the sum of the heads' lower-hull losses (greedy by slope,
    which is optimal for convex piecewise-linear costs under one linear budget)."""
    grid = np.asarray(grid, np.float64)
    flat = np.asarray(losses, np.float64).reshape(len(grid), -1)
    heads = flat.shape[1]
    out = np.full(heads, floor)
    budget = (rho - floor) * heads  # density to spend above the floor, summed over heads
    segments = []  # (slope, head, start, end): loss change per unit density on [start, end]
    for h in range(heads):
        hull = lower_hull(list(zip(grid, flat[:, h])))
        for (d0, l0), (d1, l1) in zip(hull, hull[1:]):
            segments.append(((l1 - l0) / (d1 - d0), h, d0, d1))
    # slopes rise along each hull, so sorting by slope keeps each head's segments in order (ties: by start)
    for slope, h, d0, d1 in sorted(segments, key=lambda s: (s[0], s[2])):
        if budget <= 0:
            break
        take = min(d1 - d0, budget)
        out[h] = d0 + take
        budget -= take
    return out.reshape(np.shape(losses)[1:]).astype(np.float32)


if __name__ == "__main__":
    run, context, out_path = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    started = time.perf_counter()
    model = load_model(default_model_dir())
    model, router, _ = load_trained_routers(model, run)
    tok = load_tokenizer(default_model_dir())
    valid_ids = data.tokenize(tok, data.load_text("valid", None, "tokens"))
    calib = data.windows(valid_ids, context, 2)          # windows 0-1: the curves
    valid = data.windows(valid_ids, context, 10)[2:]     # windows 2-9: selection
    test = data.windows(data.tokenize(tok, data.wikitext("test").text), context, 8)
    L, H = model.config.num_hidden_layers, model.config.num_key_value_heads
    floor = floor_density(-(-context // router.block_size), tile=router.block_size, window=router.window,
                          sink=router.sink)
    grid = [floor] + sorted(float(d) for d in sys.argv[4:])  # 0.3 (the run's ρ, the linear budget's s) among them

    def emit(record):
        with out_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record)[:300], flush=True)

    done = {}
    if out_path.exists():
        for line in out_path.read_text().splitlines():
            r = json.loads(line)
            if r.get("kind") == "curve":
                done[r["density"]] = np.asarray(r["rise"])
    for d in [0.3] + [d for d in grid if d != 0.3]:  # the run's ρ first
        if d in done:
            continue
        t = time.perf_counter()
        done[d] = calibration.head_sensitivity(model, calib, density=d, batch_size=2)
        emit({"kind": "curve", "density": d, "rise": done[d].tolist(), "seconds": time.perf_counter() - t})
    losses = np.stack([done[d] for d in grid] + [np.zeros((L, H))])  # Δloss(1) = 0 by definition
    full_grid = grid + [1.0]

    scorer = BudgetScorer(model)
    plan = [(0.3, "recent"), (0.2, "recent"), (0.3, "oracle")]
    for rho, selection in plan:
        budgets = {"curve": curve_allocation(full_grid, losses, rho, floor),
                   "sensitivity (linear, s at 0.3)": calibration.sensitivity_densities(done[0.3], rho, floor, H),
                   "uniform": np.full((L, H), rho, np.float32)}
        for name, table in budgets.items():
            for text, windows in (("valid 2-9", valid), ("test 0-7", test)):
                t = time.perf_counter()
                s = scorer(windows, table, selection, 2)
                emit({"kind": "score", "budget": name, "selection": selection, "rho": rho, "text": text,
                      "ppl": s["ppl"], "density": s["block_density"], "table_mean": float(table.mean()),
                      "table": table.round(4).tolist(), "seconds": time.perf_counter() - t})
    emit({"kind": "done", "seconds": time.perf_counter() - started})
