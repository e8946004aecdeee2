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
    padding that the kernel never reads.

    With in-tile first rows (`build_schedule(tile_mask, first_rows)`):
    first_rows: [batch, routing_heads, q_tiles, k_tiles] int32, the first row of each listed entry (0 in
    the padding): only query rows whose offset in their tile is >= it see that key tile.
    plain: [batch, routing_heads, q_tiles] int32: entries [0, plain) need no mask inside the tile (off the
    diagonal, first row <= 0); entries [plain, counts) do (the diagonal, or a first row > 0). Each part
    ascends, so the diagonal, when on, is still the last entry. Both None without first rows."""

    counts: jax.Array
    indices: jax.Array
    first_rows: jax.Array | None = None
    plain: jax.Array | None = None


def compact(active: jax.Array, masked: jax.Array | None = None, first_rows: jax.Array | None = None) -> Schedule:
    """Active flags [..., n] -> (counts [...], ascending active positions [..., n] then padding).

    Stream compaction: each active entry's slot is the running count of actives before it, so one
    cumsum and one scatter (O(n) per row) replace a sort. Padding slots hold 0 and are never read.
    With `masked` [..., n] (and `first_rows` [..., n] int32), the unmasked actives come first and the
    masked ones after them, each part ascending (a stable partition: the same cumsum, one per part), and
    the first rows travel with their entries.
    """
    *lead, n = active.shape
    rows = math.prod(lead)
    flat = active.reshape(rows, n)
    counts = flat.sum(-1, dtype=jnp.int32)
    if masked is None:
        slot = jnp.cumsum(flat, axis=-1, dtype=jnp.int32) - 1
    else:
        late = flat & masked.reshape(rows, n)
        early = flat & ~late
        plain = early.sum(-1, dtype=jnp.int32)
        slot = jnp.where(early, jnp.cumsum(early, axis=-1, dtype=jnp.int32) - 1,
                         plain[:, None] + jnp.cumsum(late, axis=-1, dtype=jnp.int32) - 1)
    target = jnp.where(flat, jnp.arange(rows, dtype=jnp.int32)[:, None] * n + slot, rows * n).ravel()
    values = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (rows, n))
    indices = jnp.zeros(rows * n, jnp.int32).at[target].set(values.ravel(), mode="drop")
    schedule = Schedule(counts.reshape(lead), indices.reshape(active.shape))
    if masked is None:
        return schedule
    first = jnp.zeros(rows * n, jnp.int32).at[target].set(first_rows.reshape(-1).astype(jnp.int32), mode="drop")
    return schedule._replace(first_rows=first.reshape(active.shape), plain=plain.reshape(lead))


def build_schedule(tile_mask: jax.Array, first_rows: jax.Array | None = None) -> Schedule:
    """tile_mask: [batch, routing_heads, q_tiles, k_tiles] bool -> `Schedule` (causal part only).

    first_rows: optional [batch, routing_heads, q_tiles, k_tiles] int, the in-tile first row of each tile
    (read where the tile is on): the schedule then carries it per entry, with the entries that need an
    in-tile mask (the diagonal, first row > 0) listed after those that need none.
    """
    nq, nk = tile_mask.shape[-2:]
    active = tile_mask & causal_tiles(nq, nk)
    if first_rows is None:
        return compact(active)
    diagonal = jnp.arange(nk)[None, :] == jnp.arange(nq)[:, None]
    return compact(active, masked=(first_rows > 0) | diagonal, first_rows=first_rows)


def validate_schedule(schedule: Schedule, tile_mask: np.ndarray, first_rows: np.ndarray | None = None, *,
                      transposed: bool = False) -> None:
    """Host-side check (tests): the lists hold exactly the causal active tiles, in range.

    Interpret mode clamps out-of-range slices silently, so a schedule bug would not show there.
    With first rows: each entry's first row is its tile's, and the entries that need an in-tile mask (the
    diagonal, first row > 0) come after `plain` entries that need none, each part ascending.
    transposed: `transpose_schedule`'s lists (per key tile, the query tiles at or after it); tile_mask and
    first_rows are then given transposed too ([..., k_tiles, q_tiles]).
    """
    counts, indices = np.asarray(schedule.counts), np.asarray(schedule.indices)
    mask = np.asarray(tile_mask)
    nq, nk = mask.shape[-2:]
    causal = np.triu(np.ones((nq, nk), bool)) if transposed else np.tril(np.ones((nq, nk), bool))
    want = mask & causal
    for idx in np.ndindex(*mask.shape[:-1]):
        c = counts[idx]
        row = indices[idx][:c]
        assert np.all((row >= idx[-1]) & (row < nk) if transposed else (row >= 0) & (row <= idx[-1])), (idx, row)
        assert set(row.tolist()) == set(np.flatnonzero(want[idx]).tolist()), idx
        if first_rows is None:
            assert np.all(np.diff(row) > 0), (idx, row)
            continue
        first = np.asarray(first_rows)[idx][row]
        np.testing.assert_array_equal(np.asarray(schedule.first_rows)[idx][:c], first, err_msg=str(idx))
        needs_mask = (first > 0) | (row == idx[-1])
        p = int(np.asarray(schedule.plain)[idx])
        assert not needs_mask[:p].any() and needs_mask[p:].all(), (idx, row, first, p)
        assert np.all(np.diff(row[:p]) > 0) and np.all(np.diff(row[p:]) > 0), (idx, row)
