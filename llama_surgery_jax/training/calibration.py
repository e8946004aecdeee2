"""Per-(layer, head) block densities calibrated on training data: the adaptive budget of block mode.

One global ρ, spread where the attention is (METHOD.md §11). On training sequences, the frozen model's dense
attention gives the mass of every tile (`block_routing.tile_attention_mass`). Pooled over all layers, heads,
rows and sequences, the heaviest candidate tiles are taken until ρ of all causal tiles are computed (the
forced sink, own and window tiles first): a layer or head whose attention is spread wins more tiles than one
with a few hot blocks. Its share, per (layer, head), is that head's density ρ_(l,h); at evaluation each head
runs the cumulative row budget (`block_routing.row_budgets`) at ρ_(l,h). The shares are fixed per head, so
the rule stays causal (no ranking over the rows of the sequence being scored); the ranking over rows is
done once, on training data.

The sensitivity budget (METHOD.md §12, "layer shares by measured perplexity sensitivity") spreads ρ over the
layers by what their misses cost instead: on training sequences, each layer alone runs StreamingLLM's tiles at
the run's ρ (every other layer dense), and the rise of the log perplexity is that layer's sensitivity s_l. At
evaluation layer l runs at ρ_l = clip(c · √s_l, floor, 1), with c set so that the mean over layers is the ρ
asked at the length evaluated (`sensitivity_densities`), every head of a layer alike. The square root measured
best on CPU (SmolLM2, 1024 tokens, ρ 0.3, WikiText-2 test: StreamingLLM 38.14 uniform, 35.62 with √s, 36.05 with
s itself; the uniform oracle 34.13). The ranking by mass (adaptive) moved tiles to early layers whose misses cost
least (+18.7 % against +16.8 % uniform at 8192 tokens).

    RUN/calibration.json: {"grid": [G], "densities": [G][layers][heads], "context", "sequences", "tile",
                           "layer_sensitivity": [layers], "sensitivity_density": ρ}
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from llama_surgery_jax.files import write_json_atomic
from llama_surgery_jax.surgery.mask import band_tiles, causal_pairs, causal_tiles

GRID = tuple(round(0.02 * i, 2) for i in range(1, 51))  # ρ = 0.02 … 1.0
FILE = "calibration.json"
SENSITIVITY_POWER = 0.5  # ρ_l ∝ s_l^power (measured: see the module docstring)


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


def layer_sensitivity(model, tokens: np.ndarray, *, density: float, batch_size: int) -> np.ndarray:
    """tokens [s, t] of training text → float64 [layers]: the rise in mean log-likelihood loss when layer l alone runs
    StreamingLLM's tiles (selection "recent") at `density`, every other layer dense (density 1 computes every tile).
    One compiled program: the per-(layer, head) densities are its argument."""
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
    rises = []
    for layer in range(layers):
        table = np.ones((layers, heads), np.float32)
        table[layer] = density
        rises.append(loss(table) - dense)
    return np.asarray(rises, np.float64)


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


def sensitivity_densities(sensitivity: np.ndarray, rho: float, floor: float, heads: int,
                          power: float = SENSITIVITY_POWER) -> np.ndarray:
    """sensitivity [layers] → densities float32 [layers, heads]: ρ_l ∝ s_l^power, `renormalised` to ρ above the
    floor, every head of a layer alike; a layer whose sensitivity is not positive weighs as the least positive one."""
    positive = np.asarray(sensitivity, np.float64)
    smallest = positive[positive > 0].min() if np.any(positive > 0) else 1.0
    weights = np.maximum(positive, smallest) ** power
    return renormalised(np.repeat(weights[:, None], heads, 1), rho, floor)


def budget_densities(calibration: dict, budget: str, rho: float, *, floor: float, heads: int) -> np.ndarray:
    """The per-(layer, head) densities [layers, heads] of a calibrated budget at ρ and a length whose floor is
    `floor`: "adaptive" (the calibrated per-head shares at ρ) or "sensitivity", both `renormalised` to ρ."""
    if budget == "adaptive":
        return renormalised(np.maximum(densities_at(calibration, rho), 1e-6), rho, floor)
    if "layer_sensitivity" not in calibration:
        raise KeyError(f"{FILE} holds no layer sensitivity (a run calibrated before the sensitivity budget): "
                       "pass --budget uniform or adaptive, or retrain")
    return sensitivity_densities(np.asarray(calibration["layer_sensitivity"]), rho, floor, heads)


def write(out: Path, densities: np.ndarray, *, context: int, sequences: int, tile: int, grid=GRID,
          sensitivity: np.ndarray | None = None, sensitivity_density: float | None = None) -> None:
    extra = {} if sensitivity is None else {"layer_sensitivity": np.asarray(sensitivity).tolist(),
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
