"""Quality against executed block density for a block-mode run: the router beside every baseline and bound.

For each context and each ρ, one row per way of filling the same budget (`block_routing.SELECTIONS`):

    surgery (adaptive)   the trained routers, per-head densities calibrated on training data (`calibration`)
    surgery (uniform)    the trained routers, ρ for every head
    surgery (sensitivity)  the trained routers, each routing head's share of ρ by its measured perplexity sensitivity
    streaming (sensitivity)  StreamingLLM under that same budget (what the allocation alone is worth)
    oracle (sensitivity) the heaviest tiles by true mass under that budget (what ranking could add to it)
    uniform oracle       the heaviest tiles by the layer's true dense attention mass, per row, ρ for every head
    lagged oracle        each query block ranks the key blocks by the previous query block's true mass: exactly
                         causal, the ceiling of routing a block from what came before it
    per-row oracle       each query row's heaviest key blocks through the prefix-union rule (`select_rows`): the
                         ceiling of row routing (router.query=row)
    global oracle        the same number of tiles per layer, the heaviest of any head and row (not causal: a bound)
    moba                 MoBA-style gate: the block's causal pooled query · each key block's mean key
    moba per row         each row's own query · each key block's mean key, through the prefix-union rule
    quest per row        each row's own query against the bound of each key block's logits (Quest's per-dimension
                         min and max keys), through the prefix-union rule
    streaming            StreamingLLM: the sink and the most recent blocks

and the dense model. Every density is counted from the tiles the attention computed, per window; attention
recall is the dense attention mass inside them. One compiled program per (context, selection): ρ and the
per-head densities are arguments.
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from llama_surgery_jax.evaluation.perplexity import perplexity, summarize, window_nll_and_stats
from llama_surgery_jax.surgery.block_routing import floor_density
from llama_surgery_jax.training import calibration

ROWS = (  # (name, selection, budget)
    ("surgery (adaptive)", "router", "adaptive"),
    ("surgery (uniform)", "router", "uniform"),
    ("surgery (sensitivity)", "router", "sensitivity"),
    ("streaming (sensitivity)", "recent", "sensitivity"),
    ("oracle (sensitivity)", "oracle", "sensitivity"),
    ("uniform oracle", "oracle", "uniform"),
    ("global oracle", "global_oracle", "uniform"),
    ("lagged oracle", "lagged_oracle", "uniform"),
    ("per-row oracle", "row_oracle", "uniform"),
    ("moba", "moba", "uniform"),
    ("moba per row", "row_moba", "uniform"),
    ("streaming", "recent", "uniform"),
    ("quest per row", "row_bound", "uniform"),
    ("surgery (thresholds)", "router", "uniform+thresholds"),
    ("surgery (sensitivity, thresholds)", "router", "sensitivity+thresholds"),
    ("quest per row (thresholds)", "row_bound", "uniform+thresholds"),
    ("quest per row (sensitivity, thresholds)", "row_bound", "sensitivity+thresholds"),
    ("per-row oracle (thresholds)", "row_oracle", "uniform+thresholds"),
)
THRESHOLDS = "+thresholds"  # a budget's tiles spent by per-row thresholds (`calibration.row_thresholds`)
THRESHOLD_SCOPE = "layer"  # one τ per layer (docs/results/cpu-row-threshold: per head did worse)
CALIBRATION_SEQUENCES = 8  # training sequences τ is calibrated on, per (context, ρ, row)


def row_key(row: tuple[str, str, str]) -> str:
    """A row's name on the command line: selection/budget, e.g. recent/sensitivity."""
    return f"{row[1]}/{row[2]}"


def pick_row(key: str) -> tuple[str, str, str]:
    """The row named `key` (`row_key`); ValueError names the rows there are."""
    for row in ROWS:
        if row_key(row) == key:
            return row
    raise ValueError(f"no row {key!r}: the rows are {', '.join(map(row_key, ROWS))}")


class BudgetScorer:
    """Perplexity and per-window stats of one model under any per-(layer, head) densities, compiled once per
    (selection, window shape)."""

    def __init__(self, model):
        self.graphdef, self.state = nnx.split(model)
        self.compiled = {}

    def __call__(self, windows: np.ndarray, densities: np.ndarray, selection: str, batch_size: int,
                 thresholds: np.ndarray | None = None) -> dict:
        key = (selection, thresholds is None)
        if key not in self.compiled:
            graphdef = self.graphdef

            def score(state, tokens, budget):
                return window_nll_and_stats(nnx.merge(graphdef, state), tokens, train=False, rng=None,
                                            selection=selection, measure_recall=True, **budget)

            self.compiled[key] = jax.jit(score)
        score = self.compiled[key]
        budget = {"block_density": jnp.asarray(densities)}
        if thresholds is not None:
            budget["thresholds"] = jnp.asarray(thresholds)
        total, per_window = 0.0, {}
        for start in range(0, len(windows), batch_size):
            nll, stats = score(self.state, jnp.asarray(windows[start:start + batch_size]), budget)
            total += float(np.sum(np.asarray(nll, np.float64)))
            for name, value in stats.items():
                per_window.setdefault(name, []).extend(np.asarray(value, np.float64).T.tolist())
        tokens = windows.shape[0] * (windows.shape[1] - 1)
        return {"ppl": math.exp(total / tokens), "tokens": tokens} | {k: summarize(v) for k, v in per_window.items()}


def runnable(row: tuple[str, str, str], router, calibrated: dict | None, training: dict | None) -> bool:
    """Whether a run can fill `row`: calibrated budgets need their calibration, per-row thresholds training text
    to calibrate τ on, and the router's thresholds a row router (router.query=row)."""
    _, selection, budget = row
    base, thresholds = budget.removesuffix(THRESHOLDS), budget.endswith(THRESHOLDS)
    if thresholds and (training is None or (selection == "router" and router.query != "row")):
        return False
    return base == "uniform" or (calibrated is not None and (base == "adaptive"
                                                             or calibration.has_sensitivity(calibrated)))


def quality_rows(model, router, calibrated: dict | None, windows_by_context: dict[int, np.ndarray],
                 densities: list[float], batch_size: int, rows=ROWS, on_row=None,
                 training: dict[int, np.ndarray] | None = None) -> list[dict]:
    """Every (context, ρ, row) of the table; the dense rows are the caller's (they need the routers removed).
    on_row(rows so far) after each row (a long measurement keeps what it has). training: windows of training text
    per context, on which the rows with per-row thresholds calibrate τ (without it those rows are left out)."""
    scorer = BudgetScorer(model)
    thresholds_of = calibration.RowThresholds(model)
    out = []
    plan = [(c, rho, row) for c in windows_by_context for rho in densities for row in rows
            if runnable(row, router, calibrated, training)]
    for context, rho, (name, selection, budget) in tqdm(plan, desc="rows"):
        n = -(-context // router.block_size)
        floor = floor_density(n, tile=router.block_size, window=router.window, sink=router.sink)
        table = density_table(model, router, calibrated, rho, budget.removesuffix(THRESHOLDS), context)
        started = time.perf_counter()
        thresholds = None
        if budget.endswith(THRESHOLDS):
            thresholds = thresholds_of(training[context][:CALIBRATION_SEQUENCES], selection=selection,
                                       densities=table, scope=THRESHOLD_SCOPE, batch_size=batch_size)
        scored = scorer(windows_by_context[context], table, selection, batch_size, thresholds)
        scored["seconds"] = time.perf_counter() - started  # compilation (and τ's calibration) included
        out.append({"context": context, "target_density": rho, "row": name, "selection": selection,
                    "budget": budget, "below_floor": rho < floor, "floor": floor,
                    "windows": len(windows_by_context[context]), **scored})
        if on_row is not None:
            on_row(out)
    return out


def dense_rows(model, windows_by_context: dict[int, np.ndarray], batch_size: int) -> dict[int, dict]:
    return {c: perplexity(model, w, batch_size=batch_size, progress=False) for c, w in windows_by_context.items()}


def markdown(rows: list[dict], dense: dict[int, dict]) -> str:
    """One table per context: rows × ρ, perplexity (gap to dense), executed density [min–max], recall."""
    lines = []
    for context, base in dense.items():
        here = [r for r in rows if r["context"] == context]
        if not here:  # no rows asked (`--rows ""`, e.g. needles alone)
            continue
        windows = here[0]["windows"]
        lines += [f"### {context} tokens ({windows} windows): dense perplexity {base['ppl']:.4f}", "",
                  "| row | ρ | perplexity | gap | executed block density (min–max) | attention recall | tie-break "
                  "share |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in here:
            d = r["block_density"]
            floor = " (floor)" if r["below_floor"] else ""
            lines.append(f"| {r['row']} | {r['target_density']}{floor} | {r['ppl']:.4f} | "
                         f"{100 * (r['ppl'] / base['ppl'] - 1):+.2f} % | "
                         f"{d['mean']:.4f} ({d['min']:.4f}–{d['max']:.4f}) | {r['attention_recall']['mean']:.4f} | "
                         f"{tie_share(r)} |")
        lines.append("")
    return "\n".join(lines)


def tie_share(row: dict) -> str:
    """The share of routed rows whose last pick tied with the best block left out (row routing), or "–"."""
    share = row.get("tie_share")
    return "–" if share is None else f"{share['mean']:.4f}"


def niah_settings(densities: list[float], oracle_density: float = 0.2, budget: str = "adaptive",
                  thresholds: bool = False) -> list[tuple[str, str, str, float]]:
    """(name, selection, budget, ρ) of the needle rows: the surgery at each ρ under the run's budget (its tiles
    spent by per-row thresholds with `thresholds`: budget "BUDGET+thresholds"), the uniform oracle at one."""
    spent = budget + THRESHOLDS if thresholds else budget
    return ([(f"surgery ({spent}) ρ={rho}", "router", spent, rho) for rho in densities]
            + ([(f"uniform oracle ρ={oracle_density}", "oracle", "uniform", oracle_density)] if oracle_density else []))


def niah_rows(model, router, calibrated: dict | None, tokenizer, filler: np.ndarray, *, lengths, depths, trials: int,
              settings, model_context: int, training: np.ndarray | None = None, batch_size: int = 8,
              log=None) -> dict[str, list[dict]]:
    """Needle-in-a-haystack rows of the routed model under each setting. The router's rows run as they are used:
    a prefill (on the kernels where they apply) and KV-cache decode (`inference.cache.Decoder`), whose routing is
    the prefill's exactly (decode ≡ re-prefill); one decoder serves every ρ (its programs take the densities as
    an argument). A "+thresholds" budget spends its tiles by per-row thresholds: τ is calibrated at each needle
    length on CALIBRATION_SEQUENCES windows of that length of `training` (token ids of the training text), and each
    length's cases run under their own τ (same programs: τ is an argument too). The oracles need every row's dense
    attention, which a cache does not keep: they run by re-prefill (`niah.Reprefill`), the reference path.
    log: `run_niah`'s, plus a line per row."""
    from llama_surgery_jax.evaluation.niah import Reprefill, needle_lengths, run_niah, summary
    from llama_surgery_jax.inference.cache import Decoder
    from llama_surgery_jax.io import corpora
    from llama_surgery_jax.training.budget import Budget

    rows, router_decoder, thresholds_of = {}, None, None
    for name, selection, budget, rho in settings:
        budget, thresholds = budget.removesuffix(THRESHOLDS), budget.endswith(THRESHOLDS)
        if budget != "uniform" and calibrated is None:
            budget = "uniform"
        table = density_table(model, router, calibrated, rho, budget)
        decoder_at = None
        if selection == "router":
            router_decoder = router_decoder or Decoder(model, block_budget=Budget(rho, budget, table))
            decoder = router_decoder.with_budget(Budget(rho, budget, table))
            if thresholds:
                if training is None or router.query != "row":
                    raise ValueError(f"needle row {name!r}: per-row thresholds need a row router (router.query=row) "
                                     "and training text to calibrate τ on")
                thresholds_of = thresholds_of or calibration.RowThresholds(model)
                decoder_at = {}
                for length in dict.fromkeys(needle_lengths(lengths, model_context)):
                    at = density_table(model, router, calibrated, rho, budget, length)
                    tau = thresholds_of(corpora.windows(training, length, CALIBRATION_SEQUENCES), selection="router",
                                        densities=at, scope=THRESHOLD_SCOPE, batch_size=batch_size)
                    decoder_at[length] = router_decoder.with_budget(Budget(rho, budget, at, tau))
        elif thresholds:
            raise ValueError(f"needle row {name!r}: per-row thresholds are for the router's rows")
        else:
            decoder = Reprefill(model, train=False, rng=None, selection=selection, block_density=jnp.asarray(table))
        started = time.perf_counter()
        rows[name] = run_niah(decoder, tokenizer, filler, lengths=lengths, depths=depths, trials=trials,
                              model_context=model_context, one_shape=selection == "router", decoder_at=decoder_at,
                              log=log)
        if log is not None:
            log(f"needles: {name}: {summary(rows[name])} ({time.perf_counter() - started:.1f} s)")
    return rows


def density_table(model, router, calibrated: dict | None, rho: float, budget: str,
                  context: int | None = None) -> np.ndarray:
    """Per-(layer, head) densities [layers, heads]: calibrated (adaptive, or sensitivity re-normalised to ρ above the
    floor at `context`) or ρ everywhere (uniform)."""
    heads = model.config.num_key_value_heads if router.routing_heads == "kv" else model.config.num_attention_heads
    if budget == "uniform":
        return np.full((model.config.num_hidden_layers, heads), rho, np.float32)
    floor = 0.0 if context is None else floor_density(-(-context // router.block_size), tile=router.block_size,
                                                      window=router.window, sink=router.sink)
    return calibration.budget_densities(calibrated, budget, rho, floor=floor, heads=heads)


def forward_seconds(model, tokens: np.ndarray, repeats: int = 5, **kwargs) -> float:
    """Median wall time of the model's hidden states (no LM head) on tokens [b, t], compilation excluded."""
    graphdef, state = nnx.split(model)
    run = jax.jit(lambda state, x: nnx.merge(graphdef, state).hidden_states(x, **kwargs)[0])
    x = jnp.asarray(tokens)
    jax.block_until_ready(run(state, x))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run(state, x))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def router_cost(model, router, tokens: np.ndarray, rho: float) -> dict:
    """The router's share of a forward at ρ: the same tiles' attention with the selection from the router
    (block features, codes, ranking) against the streaming selection (no router), and the dense forward
    (the caller removes the routers afterwards). The reference attention path, as the table's."""
    table = jnp.asarray(density_table(model, router, None, rho, "uniform"))
    common = dict(train=False, rng=None, block_density=table)
    routed = forward_seconds(model, tokens, selection="router", **common)
    streaming = forward_seconds(model, tokens, selection="recent", **common)
    return {"context": int(tokens.shape[1]), "batch": int(tokens.shape[0]), "rho": rho, "router_forward_s": routed,
            "streaming_forward_s": streaming, "router_share": (routed - streaming) / routed}
