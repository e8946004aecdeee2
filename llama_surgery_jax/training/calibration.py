"""Per-(layer, head) block densities calibrated on training data: the adaptive and sensitivity budgets of block mode.

One global ρ, spread where the attention is (METHOD.md §11). On training sequences, the frozen model's dense
attention gives the mass of every tile (`block_routing.tile_attention_mass`). Pooled over all layers, heads,
rows and sequences, the heaviest candidate tiles are taken until ρ of all causal tiles are computed (the
forced sink, own and window tiles first): a layer or head whose attention is spread wins more tiles than one
with a few hot blocks. Its share, per (layer, head), is that head's density ρ_(l,h); at evaluation each head
runs the cumulative row budget (`block_routing.row_budgets`) at ρ_(l,h). The shares are fixed per head, so
the rule stays causal (no ranking over the rows of the sequence being scored); the ranking over rows is
done once, on training data.

The sensitivity budget (METHOD.md §12, "per-head shares, layer shares set by measured perplexity sensitivity")
spreads ρ by what misses cost instead: on training sequences, each routing head alone runs StreamingLLM's tiles
at the run's ρ (every other head dense), and the rise of the log perplexity is its sensitivity s_(l,h). At
evaluation head (l, h) runs at ρ_(l,h) = clip(c · s_(l,h), floor, 1), with c set so that the mean is the ρ asked
at the length evaluated (`sensitivity_densities`). Measured on CPU (SmolLM2, 1024 tokens, ρ 0.3, 8 windows of
WikiText-2 test, dense 29.19; sensitivities from 2 training sequences), StreamingLLM's tiles under each budget:
uniform 38.14; per layer (s_l, every head of a layer alike) 35.71 with √s_l; per head 34.16 with √s_(l,h) and
33.88 with s_(l,h), below the uniform oracle's 34.13. Runs calibrated before the per-head form hold per-layer
sensitivities; they keep their √s_l rule. The ranking by mass (adaptive) moved tiles to early layers whose misses
cost least (+18.7 % against +16.8 % uniform at 8192 tokens).

    RUN/calibration.json: {"grid": [G], "densities": [G][layers][heads], "context", "sequences", "tile",
                           "head_sensitivity": [layers][heads], "sensitivity_density": ρ}
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from llama_surgery_jax.io.files import write_json_atomic
from llama_surgery_jax.surgery.mask import band_tiles, causal_pairs, causal_tiles

GRID = tuple(round(0.02 * i, 2) for i in range(1, 51))  # ρ = 0.02 … 1.0
FILE = "calibration.json"
SENSITIVITY_POWER = {"head": 1.0, "layer": 0.5}  # ρ ∝ s^power, by the table's kind (measured: module docstring)


def dense_tile_masses(model, tokens: np.ndarray, batch_size: int) -> np.ndarray:
    """The dense model's tile mass of every routed layer on tokens [s, t] → float32 [layers, s, heads, n, n]."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def masses(state, batch):
        _, aux, _ = nnx.merge(graphdef, state).hidden_states(batch, train=True, rng=None, return_mass=True)
        return [a["tile_mass"] for a in aux]

    parts = [np.stack([np.asarray(m) for m in masses(state, tokens[i:i + batch_size])])
             for i in range(0, len(tokens), batch_size)]
    return np.concatenate(parts, axis=1)


def calibrate(masses: np.ndarray, *, tile: int, window: int | None, sink: bool, grid=GRID) -> np.ndarray:
    """masses: [layers, s, heads, n, n] → densities [len(grid), layers, heads]: each head's share of the tiles
    that a global ranking by mass computes at each ρ of the grid (see the module docstring)."""
    layers, s, heads, n, _ = masses.shape
    forced = np.asarray(band_tiles(n, tile=tile, window=window, sink=sink))
    candidate = np.asarray(causal_tiles(n, n)) & ~forced
    owner = np.broadcast_to(np.arange(layers)[:, None, None, None, None] * heads
                            + np.arange(heads)[None, None, :, None, None], masses.shape)[..., candidate]
    values = masses[..., candidate].reshape(-1)
    owner = owner.reshape(-1)
    order = np.argsort(-values, kind="stable")
    sequences_heads = layers * s * heads
    forced_count = int(forced.sum())
    out = np.empty((len(grid), layers, heads))
    for g, rho in enumerate(grid):
        extra = int(np.clip(round(rho * causal_pairs(n) * sequences_heads) - forced_count * sequences_heads,
                            0, len(values)))
        won = np.bincount(owner[order[:extra]], minlength=layers * heads).reshape(layers, heads)
        out[g] = (forced_count + won / s) / causal_pairs(n)
    return out


def head_sensitivity(model, tokens: np.ndarray, *, density: float, batch_size: int) -> np.ndarray:
    """tokens [s, t] of training text → float64 [layers, heads]: the rise in mean log-likelihood loss when routing head
    h of layer l alone runs StreamingLLM's tiles (selection "recent") at `density`, every other head dense (density 1
    computes every tile). One compiled program: the per-(layer, head) densities are its argument; layers · heads + 1
    forwards."""
    graphdef, state = nnx.split(model)
    layers = len(model.model.layers)
    heads = next(layer.self_attn.attention_impl.router.routing_heads for layer in model.model.layers)

    @jax.jit
    def nll(state, batch, table):
        logits, _ = nnx.merge(graphdef, state)(batch, train=False, rng=None, block_density=table, selection="recent")
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jax.numpy.float32), axis=-1)
        return -jax.numpy.sum(jax.numpy.take_along_axis(logp, batch[:, 1:, None], axis=-1))

    def loss(table):
        total = sum(float(nll(state, tokens[i:i + batch_size], table)) for i in range(0, len(tokens), batch_size))
        return total / (tokens.shape[0] * (tokens.shape[1] - 1))

    dense = loss(np.ones((layers, heads), np.float32))
    rises = np.zeros((layers, heads))
    for layer in range(layers):
        for head in range(heads):
            table = np.ones((layers, heads), np.float32)
            table[layer, head] = density
            rises[layer, head] = loss(table) - dense
    return rises


def renormalised(weights: np.ndarray, rho: float, floor: float) -> np.ndarray:
    """weights [layers, heads] > 0 → float32 densities clip(c · weights, floor, 1), c found by bisection so that their
    mean is ρ: a calibrated budget's shares, spent at the ρ asked above the floor of the length evaluated (the floor
    differs from the calibration length's; every head at the floor when ρ ≤ floor, dense when ρ ≥ 1)."""
    weights = np.asarray(weights, np.float64)
    if rho <= floor or rho >= 1.0:
        return np.full(weights.shape, min(max(rho, floor), 1.0), np.float32)
    low, high = 0.0, 1.0 / weights.min()  # at high every head is dense: the mean is 1 > ρ
    for _ in range(100):
        middle = 0.5 * (low + high)
        if np.mean(np.clip(middle * weights, floor, 1.0)) < rho:
            low = middle
        else:
            high = middle
    return np.clip(high * weights, floor, 1.0).astype(np.float32)


def sensitivity_densities(sensitivity: np.ndarray, rho: float, floor: float, heads: int) -> np.ndarray:
    """sensitivity [layers, heads] (or [layers]: every head of a layer alike) → densities float32 [layers, heads]:
    ρ_(l,h) ∝ s^power (`SENSITIVITY_POWER` by the table's kind), `renormalised` to ρ above the floor; a head or layer
    whose sensitivity is not positive weighs as the least positive one."""
    values = np.asarray(sensitivity, np.float64)
    power = SENSITIVITY_POWER["head" if values.ndim == 2 else "layer"]
    smallest = values[values > 0].min() if np.any(values > 0) else 1.0
    weights = np.maximum(values, smallest) ** power
    if weights.ndim == 1:
        weights = np.repeat(weights[:, None], heads, 1)
    return renormalised(weights, rho, floor)


def has_sensitivity(calibration: dict) -> bool:
    """Whether a calibration holds what the sensitivity budget needs (per head; per layer in runs before it)."""
    return "head_sensitivity" in calibration or "layer_sensitivity" in calibration


def budget_densities(calibration: dict, budget: str, rho: float, *, floor: float, heads: int) -> np.ndarray:
    """The per-(layer, head) densities [layers, heads] of a calibrated budget at ρ and a length whose floor is
    `floor`: "adaptive" (the calibrated per-head shares at ρ) or "sensitivity", both `renormalised` to ρ."""
    if budget == "adaptive":
        return renormalised(np.maximum(densities_at(calibration, rho), 1e-6), rho, floor)
    if not has_sensitivity(calibration):
        raise KeyError(f"{FILE} holds no sensitivity (a run calibrated before the sensitivity budget): "
                       "pass --budget uniform or adaptive, or retrain")
    measured = calibration.get("head_sensitivity", calibration.get("layer_sensitivity"))
    return sensitivity_densities(np.asarray(measured), rho, floor, heads)


def write(out: Path, densities: np.ndarray, *, context: int, sequences: int, tile: int, grid=GRID,
          sensitivity: np.ndarray | None = None, sensitivity_density: float | None = None) -> None:
    extra = {} if sensitivity is None else {
        "head_sensitivity" if np.ndim(sensitivity) == 2 else "layer_sensitivity": np.asarray(sensitivity).tolist(),
        "sensitivity_density": sensitivity_density}
    write_json_atomic(out / FILE, {"grid": list(grid), "densities": densities.tolist(), "context": context,
                                   "sequences": sequences, "tile": tile, **extra})


def read(run: Path) -> dict | None:
    path = Path(run) / FILE
    return json.loads(path.read_text()) if path.exists() else None


def densities_at(calibration: dict, rho: float) -> np.ndarray:
    """The calibrated per-(layer, head) densities [layers, heads] at global ρ (linear in ρ between grid points)."""
    grid = np.asarray(calibration["grid"])
    table = np.asarray(calibration["densities"])  # [G, layers, heads]
    flat = table.reshape(len(grid), -1)
    # Below the grid's first point, scale it down (the forced tiles keep the floor anyway).
    rows = [np.interp(rho, grid, flat[:, j], left=flat[0, j] * rho / grid[0]) for j in range(flat.shape[1])]
    return np.clip(np.asarray(rows).reshape(table.shape[1:]), 1e-6, 1.0).astype(np.float32)


def row_thresholds(model, tokens: np.ndarray, *, selection: str, densities: np.ndarray, scope: str,
                   batch_size: int) -> np.ndarray:
    """Per-row thresholds τ [layers, heads] for a row selection (`routed_attention.threshold_rows`), calibrated on
    training tokens [s, t] at their length: the pooled sequences execute the tiles of the budgets `densities`
    [layers, heads] (per layer with scope "layer", one τ for its heads; per head with "head"). The calibration pass
    runs every layer at each sequence's own τ (the budget spent exactly), so later layers see the hidden states
    the rule gives, and τ is then fixed: at evaluation the rule is exactly causal and the executed density varies
    around ρ from window to window (reported). One call; `RowThresholds` keeps its compiled programs."""
    return RowThresholds(model)(tokens, selection=selection, densities=densities, scope=scope, batch_size=batch_size)


class RowThresholds:
    """`row_thresholds` for one model, compiled once per (selection, scope, shape): densities are an argument."""

    def __init__(self, model):
        self.model = model
        self.graphdef, self.state = nnx.split(model)
        self.compiled = {}

    def __call__(self, tokens: np.ndarray, *, selection: str, densities: np.ndarray, scope: str,
                 batch_size: int) -> np.ndarray:
        from llama_surgery_jax.surgery import block_routing as br
        from llama_surgery_jax.surgery.routed_attention import routed_layers

        key = (selection, scope)
        if key not in self.compiled:
            graphdef = self.graphdef

            def peaks(state, batch, table):
                _, aux, _ = nnx.merge(graphdef, state).hidden_states(batch, train=False, rng=None,
                                                                     selection=selection, block_density=table,
                                                                     thresholds=scope)
                return [a["row_peaks"] for a in aux]

            self.compiled[key] = jax.jit(peaks)
        table = jax.numpy.asarray(densities, jax.numpy.float32)
        parts = [[np.asarray(p) for p in self.compiled[key](self.state, tokens[i:i + batch_size], table)]
                 for i in range(0, len(tokens), batch_size)]
        n = parts[0][0].shape[-1]
        out = []
        for index, layer in enumerate(routed_layers(self.model)):
            config = layer.config
            pooled = np.concatenate([part[index] for part in parts], axis=0)  # [s, h, n, n]
            extra = np.sum(br.row_extra(layer.row_budgets(n, table), n, tile=config.block_size,
                                        window=config.window, sink=config.sink), axis=-1)
            out.append(np.asarray(br.threshold_tiles(pooled, extra, per_head=scope == "head")))
        return np.stack(out).astype(np.float32)
