"""Tile mask -> block schedule, on the device (jit-able, no host round trip).

A schedule lists, for each (batch, routing head, query tile), the active key tiles in ascending
order and their number. The kernel walks that list, so a skipped tile is never loaded or tested.
Memory is O(q_tiles * k_tiles) int32 per routing head, never O(N^2).

The tile mask is taken as given: sink and window tiles are NOT added here. Callers OR in
`sink_window_tiles(...)` (or build masks that already hold them), so that the tile mask alone says
which tiles run.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Schedule(NamedTuple):
    """counts: [batch, routing_heads, q_tiles] int32, active key tiles per query tile.
    indices: [batch, routing_heads, q_tiles, k_tiles] int32; the first `counts` entries are the
    active key tiles in ascending order (so the diagonal tile, when on, comes last); the rest are
    padding that the kernel never reads."""

    counts: jax.Array
    indices: jax.Array


def causal_tiles(q_tiles: int, k_tiles: int) -> jax.Array:
    """[q_tiles, k_tiles] bool: tiles holding at least one causal pair (square tiles)."""
    return jnp.arange(k_tiles)[None, :] <= jnp.arange(q_tiles)[:, None]


def sink_window_tiles(n_tiles: int, tile: int, window: int | None, sink: bool = True) -> jax.Array:
    """[n_tiles, n_tiles] bool: causal tiles holding a sink pair (key 0) or a window pair
    (0 <= i - j <= window). The diagonal tiles are always included (i == j)."""
    qi = jnp.arange(n_tiles)[:, None]
    kj = jnp.arange(n_tiles)[None, :]
    on = kj == qi
    if window is not None:
        # The smallest i - j inside tile pair (qi, kj) is (qi - kj - 1) * tile + 1.
        on = on | ((kj < qi) & ((qi - kj - 1) * tile + 1 <= window))
    if sink:
        on = on | (kj == 0)
    return on & (kj <= qi)


def compact(active: jax.Array) -> Schedule:
    """Active flags [..., n] -> (counts [...], ascending active positions [..., n] then padding).

    Stream compaction: each active entry's slot is the running count of actives before it, so one
    cumsum and one scatter (O(n) per row) replace a sort. Padding slots hold 0 and are never read.
    """
    *lead, n = active.shape
    rows = math.prod(lead)
    flat = active.reshape(rows, n)
    slot = jnp.cumsum(flat, axis=-1, dtype=jnp.int32) - 1
    target = jnp.where(flat, jnp.arange(rows, dtype=jnp.int32)[:, None] * n + slot, rows * n)
    values = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (rows, n))
    indices = jnp.zeros(rows * n, jnp.int32).at[target.ravel()].set(values.ravel(), mode="drop")
    return Schedule(flat.sum(-1, dtype=jnp.int32).reshape(lead), indices.reshape(active.shape))


def build_schedule(tile_mask: jax.Array) -> Schedule:
    """tile_mask: [batch, routing_heads, q_tiles, k_tiles] bool -> `Schedule` (causal part only)."""
    nq, nk = tile_mask.shape[-2:]
    return compact(tile_mask & causal_tiles(nq, nk))


def block_density(tile_mask: jax.Array) -> jax.Array:
    """Computed causal tiles / all causal tiles (METHOD.md §10)."""
    nq, nk = tile_mask.shape[-2:]
    causal = causal_tiles(nq, nk)
    return (tile_mask & causal).sum() / (causal.sum() * np.prod(tile_mask.shape[:-2]))


def validate_schedule(schedule: Schedule, tile_mask: np.ndarray) -> None:
    """Host-side check (tests): the lists hold exactly the causal active tiles, in range.

    Interpret mode clamps out-of-range slices silently, so a schedule bug would not show there.
    """
    counts, indices = np.asarray(schedule.counts), np.asarray(schedule.indices)
    mask = np.asarray(tile_mask)
    nq, nk = mask.shape[-2:]
    want = mask & np.tril(np.ones((nq, nk), bool))
    for idx in np.ndindex(*mask.shape[:-1]):
        c = counts[idx]
        row = indices[idx][:c]
        assert np.all((row >= 0) & (row <= idx[-1])), (idx, row)
        assert np.all(np.diff(row) > 0), (idx, row)
        assert set(row.tolist()) == set(np.flatnonzero(want[idx]).tolist()), idx


def codes_tile_mask(
    codes: jax.Array, tile: int, num_codes: int, *, window: int | None = 0, sink: bool = True
) -> jax.Array:
    """The tile-OR mask of per-token codes (METHOD.md §9): a causal tile is on iff some query and
    key in it share a code, or it holds a sink/window/diagonal pair.

    codes: [batch, routing_heads, tokens] int in [0, num_codes); tokens a multiple of `tile`.
    Returns [batch, routing_heads, n_tiles, n_tiles] bool, built from per-tile code occupancy
    (O(N * num_codes / tile) memory, no N x N array).
    """
    b, r, n = codes.shape
    nt = n // tile
    occ = jax.nn.one_hot(codes.reshape(b, r, nt, tile), num_codes, dtype=jnp.bfloat16).max(axis=3)
    shared = jnp.einsum("brqc,brkc->brqk", occ, occ, preferred_element_type=jnp.float32) > 0
    # Any same-code pair in a strictly-lower tile is causal; on the diagonal tile the pair (i, i)
    # is always visible, so the diagonal is on regardless.
    return (shared | sink_window_tiles(nt, tile, window, sink)) & causal_tiles(nt, nt)
