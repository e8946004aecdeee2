"""Per-(layer, head) block densities calibrated on training data: the adaptive budget of block mode.

One global ρ, spread where the attention is (METHOD.md §11). On training sequences, the frozen model's dense
attention gives the mass of every tile (`block_routing.tile_attention_mass`). Pooled over all layers, heads,
rows and sequences, the heaviest candidate tiles are taken until ρ of all causal tiles are computed (the
forced sink, own and window tiles first): a layer or head whose attention is spread wins more tiles than one
with a few hot blocks. Its share, per (layer, head), is that head's density ρ_(l,h); at evaluation each head
runs the cumulative row budget (`block_routing.row_budgets`) at ρ_(l,h). The shares are fixed per head, so
the rule stays causal (no ranking over the rows of the sequence being scored); the ranking over rows is
done once, on training data.

    RUN/calibration.json: {"grid": [G], "densities": [G][layers][heads], "context", "sequences", "tile"}
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


def write(out: Path, densities: np.ndarray, *, context: int, sequences: int, tile: int, grid=GRID) -> None:
    write_json_atomic(out / FILE, {"grid": list(grid), "densities": densities.tolist(), "context": context,
                                   "sequences": sequences, "tile": tile})


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
