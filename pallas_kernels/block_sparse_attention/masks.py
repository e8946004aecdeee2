"""The tile rules the kernels execute: causality, sink, window, diagonal, codes, sorted buckets, first rows.

The kernels own these, as splash attention owns its mask algebra: nothing here imports from
llama_surgery_jax (the method's module `llama_surgery_jax.surgery.mask` builds on them and re-exports
them), so this package stands alone. Query token i sees key j of one routing head iff

    j <= i  and  (codes[i] == codes[j]  or  i == j  or  (sink and j == 0)  or  (window is not None and i - j <= window))

without codes, causality alone. A block-sparse kernel runs tiles of `tile` × `tile` tokens: the tile
mask is the tile-wise OR of the token mask, built from per-block code sets, never from the N × N mask.
An executed tile (query block b, key block j) may carry a first row s (row routing with a prefix union,
METHOD.md §12): only the rows of block b whose offset i % tile is ≥ s see key block j; the rules above
apply on top. Shapes: b batch, h routing heads, t / s query / key tokens, n = ceil(t / tile) tiles.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

WINDOW = 128  # W of METHOD.md §2: the default local window of the router, the kernels and decode
SINK = True  # token 0 always visible


def local_rule(qpos: jax.Array, kpos: jax.Array, *, window: int | None, sink: bool) -> jax.Array:
    """The diagonal, sink and window part of the rule, broadcast over qpos and kpos (causality apart)."""
    local = qpos == kpos
    if window is not None:
        local = local | (qpos - kpos <= window)
    if sink:
        local = local | (kpos == 0)
    return local


def visible(qpos: jax.Array, kpos: jax.Array, qcode: jax.Array | None = None, kcode: jax.Array | None = None,
            *, window: int | None, sink: bool) -> jax.Array:
    """The token rule, broadcast over its arguments; without codes, causality alone (a dense layer)."""
    causal = kpos <= qpos
    if qcode is None:
        return causal
    return causal & ((qcode == kcode) | local_rule(qpos, kpos, window=window, sink=sink))


def tiled_token_mask(tiles: jax.Array, num_tokens: int, tile: int, *, codes: jax.Array | None = None,
                     window: int | None = WINDOW, sink: bool = SINK,
                     q_range: tuple[int, int] | None = None, first_rows: jax.Array | None = None) -> jax.Array:
    """What a block-sparse kernel computes: the token rule inside the tiles that are on (small N only).

    tiles: [b, h, q_tiles, k_tiles] bool; codes: [b, h, tokens] or None (tiles alone decide, causally).
    first_rows: [b, h, q_tiles, k_tiles] int or None (all 0): query i sees key block j only if
    i % tile >= first_rows[..., i // tile, j] (`first_row_visible`).
    q_range: (start, stop) of the query rows to build, all by default → bool [b, h, rows, num_tokens].
    """
    start, stop = q_range if q_range is not None else (0, num_tokens)
    qpos = jnp.arange(start, stop, dtype=jnp.int32)[:, None]
    kpos = jnp.arange(num_tokens, dtype=jnp.int32)[None, :]
    on = tiles[:, :, qpos[:, 0] // tile][:, :, :, kpos[0] // tile]
    if first_rows is not None:
        on = on & first_row_visible(first_rows, qpos, kpos, tile=tile)
    if codes is None:
        return on & visible(qpos, kpos, window=window, sink=sink)
    return on & visible(qpos, kpos, codes[:, :, start:stop, None], codes[:, :, None, :], window=window, sink=sink)


def first_row_visible(first_rows: jax.Array, qpos: jax.Array, kpos: jax.Array, *, tile: int) -> jax.Array:
    """first_rows: [..., q_tiles, k_tiles] int; qpos [t, 1], kpos [1, s] int → bool [..., t, s]: query qpos
    passes the first row of its tile with key block kpos // tile (qpos % tile ≥ first row)."""
    first = jnp.take(jnp.take(first_rows, qpos[:, 0] // tile, axis=-2), kpos[0] // tile, axis=-1)
    return qpos % tile >= first


def causal_tiles(q_tiles: int, k_tiles: int) -> jax.Array:
    """bool [q_tiles, k_tiles]: tiles holding at least one causal pair (square tiles)."""
    return jnp.arange(k_tiles)[None, :] <= jnp.arange(q_tiles)[:, None]


def band_tiles(num_tiles: int, *, tile: int, window: int | None, sink: bool) -> jax.Array:
    """bool [n, n]: causal tiles that the diagonal, sink or window rule hits (the same for every head)."""
    qb = jnp.arange(num_tiles)[:, None]
    kb = jnp.arange(num_tiles)[None, :]
    hit = qb == kb
    if sink:
        hit = hit | (kb == 0)
    if window is not None:
        # The smallest i − j between a query of block qb and a key of an earlier block kb.
        hit = hit | ((qb - kb - 1) * tile + 1 <= window)
    return hit & (kb <= qb)


def blocks(codes: jax.Array, tile: int, fill: int) -> jax.Array:
    """codes: [..., t] → [..., n, tile], the last block padded with `fill`."""
    t = codes.shape[-1]
    n = -(-t // tile)
    padded = jnp.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, n * tile - t)], constant_values=fill)
    return padded.reshape(*codes.shape[:-1], n, tile)


def shared_code_tiles(codes: jax.Array, *, tile: int) -> jax.Array:
    """codes: [..., t] int ≥ 0 → bool [..., n, n]: blocks qb and kb share at least one code.

    Each block's code set is its sorted codes; one query block at a time (`lax.map`), every code of
    every key block is looked up in it by binary search. Work n² · tile · log tile, memory O(n · tile)
    per head: linear in t, never n² · tile. Padding (−1) meets padding only on the diagonal, which
    the rule computes anyway.
    """
    padded = blocks(codes, tile, fill=-1)  # [..., n, tile]
    lead = padded.shape[:-2]
    flat = padded.reshape(-1, *padded.shape[-2:])  # [m, n, tile]
    code_sets = jnp.sort(flat, axis=-1)

    def against_every_key_block(code_set):  # [m, tile] → bool [m, n]
        search = jax.vmap(lambda s, keys: jnp.searchsorted(s, keys.reshape(-1)).reshape(keys.shape))
        index = jnp.clip(search(code_set, flat), 0, tile - 1)  # [m, n, tile]
        found = jnp.take_along_axis(code_set[:, None, :], index, axis=-1) == flat
        return jnp.any(found, axis=-1)

    shared = jax.lax.map(against_every_key_block, jnp.moveaxis(code_sets, 1, 0))  # [n, m, n]
    return jnp.moveaxis(shared, 0, 1).reshape(*lead, shared.shape[0], shared.shape[0])


def tile_mask(codes: jax.Array, *, tile: int, window: int | None, sink: bool) -> jax.Array:
    """codes: [..., t] int → bool [..., n, n]: the tile-wise OR of the token rule (tiles in original order)."""
    n = -(-codes.shape[-1] // tile)
    return (shared_code_tiles(codes, tile=tile) & causal_tiles(n, n)) | band_tiles(n, tile=tile, window=window,
                                                                                   sink=sink)


def sorted_bucket_tiles(sorted_codes: jax.Array, *, tile: int) -> jax.Array:
    """sorted_codes: [..., t], non-decreasing → bool [..., n, n]: causal tile pairs that share a code.

    In sorted order a tile's codes are a contiguous run of the values present, so two tiles share a code
    iff their [min, max] ranges overlap: O(n²), no N × N array. A padded tail must use a code of its own
    above every real one (the kernels use INT32_MAX).
    """
    n = -(-sorted_codes.shape[-1] // tile)
    padded = blocks(sorted_codes, tile, fill=jnp.iinfo(jnp.int32).max)
    lo, hi = padded.min(-1), padded.max(-1)
    overlap = (lo[..., :, None] <= hi[..., None, :]) & (lo[..., None, :] <= hi[..., :, None])
    return overlap & causal_tiles(n, n)


def causal_pairs(t: int) -> int:
    return t * (t + 1) // 2


def block_density(tiles: jax.Array) -> jax.Array:
    """tiles: bool [..., n, n] → float32 scalar: computed causal tiles / causal tiles (METHOD.md §10)."""
    n = tiles.shape[-1]
    causal = causal_tiles(n, n)
    return jnp.sum(tiles & causal, dtype=jnp.float32) / (tiles.size // (n * n) * causal_pairs(n))
