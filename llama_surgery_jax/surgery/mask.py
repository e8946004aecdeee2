"""The visibility rule, once: tokens, tiles, sorted buckets and densities (METHOD.md §4, §9, §10).

Every other module takes the rule from here: the router's training forward (`reference_attention`), the
kernels and their reference (`pallas_kernels.block_sparse_attention`), KV-cache decode, the baselines and
every report. Query token i sees key j of one routing head iff

    j <= i  and  (codes[i] == codes[j]  or  i == j  or  (sink and j == 0)  or  (window is not None and i - j <= window))

with codes the prefix codes on the top k = levels − d_max tree levels (`router.prefix_codes`). A
block-sparse kernel runs tiles of `tile` × `tile` tokens: the tile mask is the tile-wise OR of the token
mask, built from per-block code sets, never from the N × N mask. Shapes: b batch, h routing heads,
t / s query / key tokens, n = ceil(t / tile) tiles.

The tile rules the kernels execute (causality, sink, window, the tile OR of codes, sorted buckets,
densities) are the kernels' own (`pallas_kernels.block_sparse_attention.masks`); this module builds the
method's counts on them and re-exports them, so its callers import the whole rule from one place.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.block_sparse_attention.masks import (
    SINK,
    WINDOW,
    band_tiles,
    block_density,
    causal_pairs,
    causal_tiles,
    local_rule,
    shared_code_tiles,
    sorted_bucket_tiles,
    tile_mask,
    tiled_token_mask,
    visible,
)
from pallas_kernels.block_sparse_attention.masks import blocks as _blocks

__all__ = [
    "SINK",
    "WINDOW",
    "band_pass_tiles",
    "band_tiles",
    "block_density",
    "bucket_permutation",
    "bucket_tiles",
    "causal_pairs",
    "causal_tiles",
    "executed_block_density",
    "executed_tiles",
    "local_rule",
    "shared_code_tiles",
    "sorted_bucket_tiles",
    "tile_mask",
    "tiled_token_mask",
    "token_density",
    "token_mask",
    "visible",
]


def token_mask(codes_q: jax.Array, codes_k: jax.Array, positions_q: jax.Array, positions_k: jax.Array, *,
               window: int | None, sink: bool) -> jax.Array:
    """codes_q: [..., t], codes_k: [..., s] int; positions_q: [t], positions_k: [s] int → bool [..., t, s]."""
    return visible(positions_q[:, None], positions_k[None, :], codes_q[..., :, None], codes_k[..., None, :],
                   window=window, sink=sink)


def bucket_permutation(codes: jax.Array) -> jax.Array:
    """codes: [..., t] → [..., t] int32: token order sorted by (code, position), per head (§9)."""
    return jnp.argsort(codes, axis=-1, stable=True).astype(jnp.int32)


def bucket_tiles(codes: jax.Array, *, tile: int) -> jax.Array:
    """codes: [..., t] → bool [..., n, n]: tiles of the bucket pass over the code-sorted sequence.

    In sorted order each code is one contiguous run with positions increasing, so the equal-code pairs
    with j ≤ i are exactly those in tiles kb ≤ qb whose blocks share a code.
    """
    return sorted_bucket_tiles(jnp.take_along_axis(codes, bucket_permutation(codes), axis=-1), tile=tile)


def band_pass_tiles(codes: jax.Array, *, tile: int, window: int | None, sink: bool) -> jax.Array:
    """codes: [..., t] → bool [..., n, n]: band tiles (original order) holding a window or sink pair whose
    codes differ, i.e. a pair that the bucket pass does not cover. Work O(t · (window + tile)).

    The kernel's band pass runs every `band_tiles` tile (`executed_tiles`); this finer count says how many
    of them the bucket pass leaves work for.
    """
    t = codes.shape[-1]
    n = -(-t // tile)
    blocks = _blocks(codes, tile, fill=-1)
    valid = _blocks(jnp.ones(t, bool), tile, fill=False)
    qb = jnp.arange(n)
    inside = jnp.arange(tile)
    tiles = jnp.zeros((*codes.shape[:-1], n, n), bool)
    if window is not None:
        for offset in range(min(n, window // tile + 2)):  # farther blocks hold no pair with i − j ≤ window
            kb = qb - offset
            keys = jnp.take(blocks, jnp.maximum(kb, 0), axis=-2)
            key_valid = valid[jnp.maximum(kb, 0)] & (kb >= 0)[:, None]
            distance = offset * tile + inside[:, None] - inside[None, :]  # i − j inside the tile pair
            pair = (distance >= 0) & (distance <= window)
            differ = blocks[..., :, :, None] != keys[..., :, None, :]
            hit = jnp.any(differ & pair & valid[:, :, None] & key_valid[:, None, :], axis=(-2, -1))
            tiles = tiles.at[..., qb, jnp.maximum(kb, 0)].max(hit & (kb >= 0))
    if sink:
        first = codes[..., :1, None]  # token 0's code, against every query of every block
        hit = jnp.any((blocks != first) & valid, axis=-1)
        tiles = tiles.at[..., :, 0].max(hit)
    return tiles


def executed_tiles(codes: jax.Array, *, tile: int, window: int | None, sink: bool) -> jax.Array:
    """codes: [..., t] → int32 [...]: the tiles the kernel computes per head for exact token routing (§9):
    every bucket-pass tile over the code-sorted sequence plus every band tile (sink, window, diagonal) in
    original order. This is what the kernel is given (`pallas_kernels.token_routed_tiles`), the count that
    every report and every baseline is sized from; it can exceed the causal tile count (two passes)."""
    n = -(-codes.shape[-1] // tile)
    band = jnp.sum(band_tiles(n, tile=tile, window=window, sink=sink), dtype=jnp.int32)
    return jnp.sum(bucket_tiles(codes, tile=tile), axis=(-2, -1), dtype=jnp.int32) + band


def executed_block_density(codes: jax.Array, *, tile: int, window: int | None, sink: bool) -> jax.Array:
    """codes: [..., t] → float32 [...]: `executed_tiles` / causal tiles, per head."""
    n = -(-codes.shape[-1] // tile)
    return executed_tiles(codes, tile=tile, window=window, sink=sink).astype(jnp.float32) / causal_pairs(n)


def token_density(codes: jax.Array, *, window: int | None, sink: bool, chunk: int = 256) -> jax.Array:
    """codes: [..., t] → float32 scalar: visible causal pairs / causal pairs, over all leading axes.

    Counted per chunk of query rows, so memory stays O(chunk · t).
    """
    t = codes.shape[-1]
    positions = jnp.arange(t)
    n = -(-t // chunk)
    padded = _blocks(codes, chunk, fill=-1)  # [..., n, chunk]

    def count(i):
        rows = i * chunk + jnp.arange(chunk)
        codes_q = jnp.take(padded, i, axis=-2)
        seen = token_mask(codes_q, codes, rows, positions, window=window, sink=sink) & (rows < t)[:, None]
        return jnp.sum(seen, dtype=jnp.float32)

    total = jnp.sum(jax.lax.map(count, jnp.arange(n)))
    heads = codes.size // t
    return total / (heads * causal_pairs(t))
