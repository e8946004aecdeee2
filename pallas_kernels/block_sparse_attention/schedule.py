"""Tile mask -> block schedule, on the device (jit-able, no host round trip).

A schedule lists, for each (batch, routing head, query tile), the active key tiles in ascending
order and their number. The kernel walks that list, so a skipped tile is never loaded or tested.
Memory is O(q_tiles * k_tiles) int32 per routing head, never O(N^2).

The tile mask is taken as given: sink and window tiles are NOT added here. Callers OR in
`masks.band_tiles(...)` (or build masks that already hold them), so that the tile mask alone says
which tiles run.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .masks import causal_tiles


class Schedule(NamedTuple):
    """counts: [batch, routing_heads, q_tiles] int32, active key tiles per query tile.
    indices: [batch, routing_heads, q_tiles, k_tiles] int32; the first `counts` entries are the
    active key tiles in ascending order (so the diagonal tile, when on, comes last); the rest are
    padding that the kernel never reads."""

    counts: jax.Array
    indices: jax.Array


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
