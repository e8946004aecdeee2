"""The visibility rule, once: tokens, tiles, sorted buckets and densities (METHOD.md §4, §9, §10).

Every other module takes the rule from here: the router's training forward (`reference_attention`), the
kernels and their reference (`pallas_kernels.block_sparse_attention`), KV-cache decode, the baselines and
every report. Query token i sees key j of one routing head iff

    j <= i  and  (codes[i] == codes[j]  or  i == j  or  (sink and j == 0)  or  (window is not None and i - j <= window))

with codes the prefix codes on the top k = levels − d_max tree levels (`router.prefix_codes`). A
block-sparse kernel runs tiles of `tile` × `tile` tokens: the tile mask is the tile-wise OR of the token
mask, built from per-block code sets, never from the N × N mask. Shapes: b batch, h routing heads,
t / s query / key tokens, n = ceil(t / tile) tiles.
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


def token_mask(codes_q: jax.Array, codes_k: jax.Array, positions_q: jax.Array, positions_k: jax.Array, *,
               window: int | None, sink: bool) -> jax.Array:
    """codes_q: [..., t], codes_k: [..., s] int; positions_q: [t], positions_k: [s] int → bool [..., t, s]."""
    return visible(positions_q[:, None], positions_k[None, :], codes_q[..., :, None], codes_k[..., None, :],
                   window=window, sink=sink)


def tiled_token_mask(tiles: jax.Array, num_tokens: int, tile: int, *, codes: jax.Array | None = None,
                     window: int | None = WINDOW, sink: bool = SINK,
                     q_range: tuple[int, int] | None = None) -> jax.Array:
    """What a block-sparse kernel computes: the token rule inside the tiles that are on (small N only).

    tiles: [b, h, q_tiles, k_tiles] bool; codes: [b, h, tokens] or None (tiles alone decide, causally).
    q_range: (start, stop) of the query rows to build, all by default → bool [b, h, rows, num_tokens].
    """
    start, stop = q_range if q_range is not None else (0, num_tokens)
    qpos = jnp.arange(start, stop, dtype=jnp.int32)[:, None]
    kpos = jnp.arange(num_tokens, dtype=jnp.int32)[None, :]
    on = tiles[:, :, qpos[:, 0] // tile][:, :, :, kpos[0] // tile]
    if codes is None:
        return on & visible(qpos, kpos, window=window, sink=sink)
    return on & visible(qpos, kpos, codes[:, :, start:stop, None], codes[:, :, None, :], window=window, sink=sink)


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


def _blocks(codes: jax.Array, tile: int, fill: int) -> jax.Array:
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
    blocks = _blocks(codes, tile, fill=-1)  # [..., n, tile]
    lead = blocks.shape[:-2]
    flat = blocks.reshape(-1, *blocks.shape[-2:])  # [m, n, tile]
    code_sets = jnp.sort(flat, axis=-1)

    def against_every_key_block(code_set):  # [m, tile] → bool [m, n]
        search = jax.vmap(lambda s, keys: jnp.searchsorted(s, keys.reshape(-1)).reshape(keys.shape))
        index = jnp.clip(search(code_set, flat), 0, tile - 1)  # [m, n, tile]
        found = jnp.take_along_axis(code_set[:, None, :], index, axis=-1) == flat
        return jnp.any(found, axis=-1)

    shared = jax.lax.map(against_every_key_block, jnp.moveaxis(code_sets, 1, 0))  # [n, m, n]
    return jnp.moveaxis(shared, 0, 1).reshape(*lead, shared.shape[0], shared.shape[0])


def tile_mask(codes: jax.Array, *, tile: int, window: int | None, sink: bool) -> jax.Array:
    """codes: [..., t] int → bool [..., n, n]: the tile-wise OR of `token_mask` (tiles in original order)."""
    n = -(-codes.shape[-1] // tile)
    return (shared_code_tiles(codes, tile=tile) & causal_tiles(n, n)) | band_tiles(n, tile=tile, window=window,
                                                                                   sink=sink)


def bucket_permutation(codes: jax.Array) -> jax.Array:
    """codes: [..., t] → [..., t] int32: token order sorted by (code, position), per head (§9)."""
    return jnp.argsort(codes, axis=-1, stable=True).astype(jnp.int32)


def sorted_bucket_tiles(sorted_codes: jax.Array, *, tile: int) -> jax.Array:
    """sorted_codes: [..., t], non-decreasing → bool [..., n, n]: causal tile pairs that share a code.

    In sorted order a tile's codes are a contiguous run of the values present, so two tiles share a code
    iff their [min, max] ranges overlap: O(n²), no N × N array. A padded tail must use a code of its own
    above every real one (the kernels use INT32_MAX).
    """
    n = -(-sorted_codes.shape[-1] // tile)
    blocks = _blocks(sorted_codes, tile, fill=jnp.iinfo(jnp.int32).max)
    lo, hi = blocks.min(-1), blocks.max(-1)
    overlap = (lo[..., :, None] <= hi[..., None, :]) & (lo[..., None, :] <= hi[..., :, None])
    return overlap & causal_tiles(n, n)


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
        seen = token_mask(codes_q, codes, rows, positions, window=window, sink=sink) & (rows < t)[:, None]
        return jnp.sum(seen, dtype=jnp.float32)

    total = jnp.sum(jax.lax.map(count, jnp.arange(n)))
    heads = codes.size // t
    return total / (heads * causal_pairs(t))


def block_density(tiles: jax.Array) -> jax.Array:
    """tiles: bool [..., n, n] → float32 scalar: computed causal tiles / causal tiles (METHOD.md §10)."""
    n = tiles.shape[-1]
    causal = causal_tiles(n, n)
    return jnp.sum(tiles & causal, dtype=jnp.float32) / (tiles.size // (n * n) * causal_pairs(n))
