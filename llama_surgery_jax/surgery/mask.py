"""From routing to what the kernels run (METHOD.md §4 and §9): the hard mask, tile masks, sorting.

The mask semantics, shared bit for bit by training (`masked_attention`) and the kernels: query token
i sees key j iff

    j <= i  and  (codes[i] == codes[j]  or  (sink and j == 0)  or  (window is not None and i - j <= window)
                  or  i == j)

with codes the prefix codes on the top k = levels − d_max tree levels (`router.prefix_codes`).
The tile mask [..., query tiles, key tiles] is the tile-wise OR of that token mask, computed from
per-block code sets (never from the N × N mask): a tile is computed iff its two blocks share a code,
or the sink, window or diagonal rule hits it. Shapes: b batch, h routing heads, t / s query / key tokens.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from llama_surgery_jax.surgery.config import RouterConfig
from llama_surgery_jax.surgery.router import route


class HardTopology(NamedTuple):
    """What a block-sparse kernel needs for one layer. codes: [b, h, t] int32 prefix codes;
    tile_mask: [b, h, ceil(t / tile), ceil(t / tile)] bool (tile-wise OR of the token mask)."""

    codes: jax.Array
    tile_mask: jax.Array


def token_mask(codes_q: jax.Array, codes_k: jax.Array, positions_q: jax.Array, positions_k: jax.Array, *,
               window: int | None, sink: bool) -> jax.Array:
    """codes_q: [..., t], codes_k: [..., s] int; positions_q: [t], positions_k: [s] int → bool [..., t, s]."""
    offset = positions_q[:, None] - positions_k[None, :]
    visible = (codes_q[..., :, None] == codes_k[..., None, :]) | (offset == 0)
    if sink:
        visible = visible | (positions_k == 0)[None, :]
    if window is not None:
        visible = visible | (offset <= window)
    return visible & (offset >= 0)


def _blocks(codes: jax.Array, tile: int, fill: int) -> jax.Array:
    """codes: [..., t] → [..., ceil(t / tile), tile], the last block padded with `fill`."""
    t = codes.shape[-1]
    n = -(-t // tile)
    padded = jnp.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, n * tile - t)], constant_values=fill)
    return padded.reshape(*codes.shape[:-1], n, tile)


def shared_code_tiles(codes: jax.Array, *, tile: int) -> jax.Array:
    """codes: [..., t] int → bool [..., n, n]: blocks qb and kb share at least one code (n = ceil(t / tile)).

    Each block's code set is its sorted codes; every code of block kb is looked up in block qb's set
    (n² · tile · log tile work, no N × N). Padding (−1) can only meet padding on the diagonal, which is
    always computed anyway.
    """
    blocks = _blocks(codes, tile, fill=-1)
    code_sets = jnp.sort(blocks, axis=-1)

    def share(code_set, block):  # [tile], [tile] → bool
        index = jnp.clip(jnp.searchsorted(code_set, block), 0, tile - 1)
        return jnp.any(code_set[index] == block)

    per_key_block = jax.vmap(share, in_axes=(None, 0))  # one query block against every key block
    per_query_block = jax.vmap(per_key_block, in_axes=(0, None))
    flat = code_sets.reshape(-1, *code_sets.shape[-2:])
    flat_blocks = blocks.reshape(flat.shape)
    shared = jax.vmap(per_query_block)(flat, flat_blocks)
    return shared.reshape(*codes.shape[:-1], *shared.shape[-2:])


def band_tiles(num_tiles: int, *, tile: int, window: int | None, sink: bool) -> jax.Array:
    """bool [n, n]: causal tiles that the diagonal, sink or window rule hits (the same for every head)."""
    qb = jnp.arange(num_tiles)[:, None]
    kb = jnp.arange(num_tiles)[None, :]
    hit = qb == kb
    if sink:
        hit = hit | (kb == 0)
    if window is not None:
        # Smallest i − j between a query of block qb and a key of an earlier, full block kb.
        hit = hit | ((qb - kb - 1) * tile + 1 <= window)
    return hit & (kb <= qb)


def tile_mask(codes: jax.Array, *, tile: int, window: int | None, sink: bool) -> jax.Array:
    """codes: [..., t] int → bool [..., n, n], n = ceil(t / tile): the tile-wise OR of `token_mask`."""
    n = -(-codes.shape[-1] // tile)
    causal = jnp.tril(jnp.ones((n, n), bool))
    return (shared_code_tiles(codes, tile=tile) & causal) | band_tiles(n, tile=tile, window=window, sink=sink)


def hard_topology(params: dict[str, jax.Array], x: jax.Array, *, config: RouterConfig, routing_heads: int,
                  tile: int | None = None, rng: jax.Array | None = None) -> HardTopology:
    """One layer's router params and attention input x: [b, t, hidden] → HardTopology at `tile`.

    rng None: the argmax routes (evaluation). tile defaults to config.block_size.
    """
    codes = route(params, x, config=config, routing_heads=routing_heads, rng=rng).codes
    tile = config.block_size if tile is None else tile
    return HardTopology(codes, tile_mask(codes, tile=tile, window=config.window, sink=config.sink))


def bucket_permutation(codes: jax.Array) -> jax.Array:
    """codes: [..., t] → [..., t] int32: token order sorted by (code, position), per head (§9)."""
    return jnp.argsort(codes, axis=-1, stable=True).astype(jnp.int32)


def bucket_tiles(codes: jax.Array, *, tile: int) -> jax.Array:
    """codes: [..., t] → bool [..., n, n]: tiles of the bucket pass over the sorted sequence.

    In sorted order each code is one contiguous run with positions increasing, so the equal-code pairs
    with j ≤ i are exactly those in tiles kb ≤ qb whose blocks share a code (this is their tile OR).
    """
    sorted_codes = jnp.take_along_axis(codes, bucket_permutation(codes), axis=-1)
    n = -(-codes.shape[-1] // tile)
    return shared_code_tiles(sorted_codes, tile=tile) & jnp.tril(jnp.ones((n, n), bool))


def band_pass_tiles(codes: jax.Array, *, tile: int, window: int | None, sink: bool) -> jax.Array:
    """codes: [..., t] → bool [..., n, n]: tiles of the band pass in original order, which sees only the
    window and sink pairs whose codes differ (equal codes are the bucket pass's), so no pair counts twice.

    Work O(t · (window + tile)): only the block offsets the window reaches are compared token by token.
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


def causal_pairs(t: int) -> int:
    return t * (t + 1) // 2


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
        visible = token_mask(codes_q, codes, rows, positions, window=window, sink=sink) & (rows < t)[:, None]
        return jnp.sum(visible, dtype=jnp.float32)

    total = jnp.sum(jax.lax.map(count, jnp.arange(n)))
    heads = codes.size // t
    return total / (heads * causal_pairs(t))


def block_density(tiles: jax.Array) -> jax.Array:
    """tiles: bool [..., n, n] → float32 scalar: computed tiles / causal tiles."""
    n = tiles.shape[-1]
    return jnp.sum(tiles, dtype=jnp.float32) / (tiles.size // (n * n) * causal_pairs(n))
