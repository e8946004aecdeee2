"""The chunked reference attention of the surgery: the training path and the kernels' correctness oracle.

Query rows are processed in chunks of `RouterExecution.query_chunk` (`lax.map`), each under
`jax.checkpoint`, so neither pass ever holds an N × N array: memory is O(chunk · N) per step, and the
backward recomputes each chunk's mask and scores. The mask is built per chunk from prefix codes
(`topology.token_mask`) and, in training, from the soft routes (`router.tree_distance`).

Attention with the straight-through bridge (METHOD.md §5), in float32:

    S = Q Kᵀ / √D, −∞ where the hard mask is 0          E = exp(S − max S)
    A = (E ⊙ m) / Σ_s (E ⊙ m)                             O = A V

with m = straight_through(hard, soft). This is §5's (P ⊙ m) / (Σ P ⊙ m + ε) with P = E / Σ E: the
factor Σ E cancels, and no ε is needed because the row maximum is visible (m = 1, E = 1), so the
denominator is ≥ 1. In the forward pass m equals the hard mask exactly, so A is bit for bit the masked
softmax (`model.dense_attention`'s arithmetic). Hard-masked pairs have E = 0 and teach the router
nothing; visible pairs send ∂L/∂m through the soft mask into the router.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from llama_surgery_jax.surgery.config import RouterConfig, RouterExecution
from llama_surgery_jax.surgery.mask import token_mask
from llama_surgery_jax.surgery.router import soft_mask, straight_through, tree_distance


def attend(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array,
           multiplier: jax.Array | None = None) -> jax.Array:
    """Masked softmax attention with an optional straight-through multiplier, GQA native.

    q: [b, t, heads, d]; k, v: [b, s, kv_heads, d]; visible: bool [b, h, t, s] and multiplier:
    float [b, h, t, s] with h = heads (per query head) or kv_heads (one route per GQA group)
    → [b, t, heads, d] in q's dtype. Every row needs at least one visible key.
    """
    b, t, heads, d = q.shape
    kv = k.shape[2]
    groups = heads // kv

    def per_group(mask):  # [b, h, t, s] → [b, kv, groups or 1, t, s]
        return mask.reshape(b, kv, mask.shape[1] // kv, *mask.shape[2:])

    qg = q.reshape(b, t, kv, groups, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) / math.sqrt(d)
    scores = jnp.where(per_group(visible), scores, -jnp.inf)
    unnormalized = jnp.exp(scores - jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True)))
    if multiplier is not None:
        unnormalized = unnormalized * per_group(multiplier)
    probs = unnormalized / jnp.sum(unnormalized, axis=-1, keepdims=True)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, heads, d).astype(q.dtype)


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, codes: jax.Array,
                     routes: jax.Array | None = None, *, config: RouterConfig,
                     execution: RouterExecution = RouterExecution()) -> tuple[jax.Array, jax.Array]:
    """Routed causal attention, chunked over queries. Returns (out, visible_pairs).

    q: [b, t, heads, d]; k, v: [b, t, kv_heads, d]; codes: [b, h, t] int prefix codes (h = heads or
    kv_heads); routes: [b, h, t, l, c] float32 or None. With routes, the mask is
    straight_through(hard, soft) and gradients reach the router; None: the hard mask alone (evaluation).
    out: [b, t, heads, d] in q's dtype; visible_pairs: float32 scalar, summed over b and h.
    """
    t = q.shape[1]
    chunk = min(execution.query_chunk, t)
    n_chunks = -(-t // chunk)
    pad = n_chunks * chunk - t
    positions_k = jnp.arange(t)

    def pad_tokens(x, axis):
        return jnp.pad(x, [(0, pad) if a == axis else (0, 0) for a in range(x.ndim)])

    q_chunks = jnp.moveaxis(pad_tokens(q, 1).reshape(q.shape[0], n_chunks, chunk, *q.shape[2:]), 1, 0)
    codes_padded = pad_tokens(codes, 2)
    routes_padded = None if routes is None else pad_tokens(routes, 2)

    @jax.checkpoint
    def one_chunk(index, q_chunk):
        start = index * chunk
        positions_q = start + jnp.arange(chunk)
        codes_q = jax.lax.dynamic_slice_in_dim(codes_padded, start, chunk, axis=2)
        # Padded query rows (positions ≥ t) see keys causally like real rows, so they stay finite.
        hard = token_mask(codes_q, codes, positions_q, positions_k, window=config.window, sink=config.sink)
        multiplier = None
        if routes_padded is not None:
            routes_q = jax.lax.dynamic_slice_in_dim(routes_padded, start, chunk, axis=2)
            soft = soft_mask(tree_distance(routes_q, routes), d_max=config.d_max,
                             temperature=config.soft_mask_temperature)
            multiplier = straight_through(hard, soft)
        out = attend(q_chunk, k, v, hard, multiplier)
        visible_pairs = jnp.sum(hard & (positions_q < t)[:, None], dtype=jnp.int32)
        return out, visible_pairs

    outs, visible_pairs = jax.lax.map(lambda args: one_chunk(*args), (jnp.arange(n_chunks), q_chunks))
    out = jnp.moveaxis(outs, 0, 1).reshape(q.shape[0], n_chunks * chunk, *q.shape[2:])[:, :t]
    return out, jnp.sum(visible_pairs.astype(jnp.float32))


def gathered_attention(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array,
                       budget: int) -> tuple[jax.Array, jax.Array]:
    """One query per sequence over at most `budget` visible keys per routing head, gathered from the cache.

    q: [b, h, d]; k, v: [b, S, k, d]; visible: bool [b, r, S] with r = h or k → (out [b, h, d], the most
    keys any (sequence, routing head) sees: int32 scalar; out is exact only when it is <= budget).
    """
    b, heads, d = q.shape
    kv_heads = k.shape[2]
    r = visible.shape[1]
    kv_of_r = jnp.arange(r) // (r // kv_heads)  # r = h: head h reads KV head h // group; r = k: itself
    # The first `budget` visible slots in position order, compacted by a prefix sum: O(S), no sort.
    count = jnp.sum(visible, axis=-1, dtype=jnp.int32)  # [b, r]
    rank = jnp.cumsum(visible, axis=-1, dtype=jnp.int32) - 1
    target = jnp.where(visible, rank, budget)  # invisible slots, and visible ones past the budget, drop
    batch = jnp.arange(b)[:, None, None]
    heads_r = jnp.arange(r)[None, :, None]
    slot_ids = jnp.broadcast_to(jnp.arange(visible.shape[-1], dtype=jnp.int32), visible.shape)
    slots = jnp.zeros((b, r, budget), jnp.int32).at[batch, heads_r, target].set(slot_ids, mode="drop")
    valid = jnp.arange(budget)[None, None, :] < count[..., None]
    k_sel = k[batch, slots, kv_of_r[None, :, None]]  # [b, r, M, d]: only these rows are read
    v_sel = v[batch, slots, kv_of_r[None, :, None]]
    qr = q.reshape(b, r, heads // r, d)
    scores = jnp.einsum("brgd,brmd->brgm", qr, k_sel, preferred_element_type=jnp.float32) / math.sqrt(d)
    scores = jnp.where(valid[:, :, None, :], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("brgm,brmd->brgd", probs.astype(v.dtype), v_sel, preferred_element_type=jnp.float32)
    most = jnp.max(count)
    return out.reshape(b, heads, d).astype(q.dtype), most


def rows_visible(first_rows: jax.Array, positions_q: jax.Array, positions_k: jax.Array, tile: int) -> jax.Array:
    """bool [b, h, queries, keys]: key s is visible to query i iff s ≤ i and tile (i // T, s // T) runs from a row ≤
    i % T (first_rows int [b, h, n, n], `tile` where a tile is not computed; queries past the last block read it)."""
    rows = jnp.take(first_rows, jnp.minimum(positions_q // tile, first_rows.shape[-2] - 1), axis=2)
    from_row = jnp.take(rows, positions_k // tile, axis=3)
    return (from_row <= (positions_q % tile)[:, None]) & (positions_k[None, :] <= positions_q[:, None])


def tile_masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, tiles: jax.Array, *, tile: int,
                          chunk: int = 256, first_rows: jax.Array | None = None) -> jax.Array:
    """Causal attention inside computed tiles, chunked over query rows (memory O(chunk · t)).

    q: [b, t, h, d]; k, v: [b, t, k, d]; tiles: bool [b or 1, h or k or 1, n, n] → [b, t, h, d].
    first_rows: optional int [same as tiles]: a computed tile is seen only by its query block's rows whose
    offset in the block is ≥ it (row routing's prefix union, `block_routing.select_rows`); None: every row.
    """
    b, t, heads, d = q.shape
    chunk = min(chunk, t)
    n_chunks = -(-t // chunk)
    pad = n_chunks * chunk - t
    q_chunks = jnp.moveaxis(jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, n_chunks, chunk, heads, d),
                            1, 0)
    routing_heads = k.shape[2] if tiles.shape[1] == 1 else tiles.shape[1]  # a shared mask: one per KV head
    tiles = jnp.broadcast_to(tiles, (b, routing_heads, *tiles.shape[-2:]))
    if first_rows is None:
        first_rows = jnp.zeros(tiles.shape, jnp.int32)
    first_rows = jnp.where(tiles, jnp.broadcast_to(first_rows, tiles.shape), tile)
    positions_k = jnp.arange(t)

    def one_chunk(args):
        index, q_chunk = args
        positions_q = index * chunk + jnp.arange(chunk)
        return attend(q_chunk, k, v, rows_visible(first_rows, positions_q, positions_k, tile))

    outs = jax.lax.map(one_chunk, (jnp.arange(n_chunks), q_chunks))
    return jnp.moveaxis(outs, 0, 1).reshape(b, n_chunks * chunk, heads, d)[:, :t]


SKIPPED_LOGIT_CAP = 30.0  # exp of a skipped key's logit above the row's visible max, capped (it only scales a gradient)


def straight_through_tile_attention(q: jax.Array, k: jax.Array, v: jax.Array, first_rows: jax.Array,
                                    soft: jax.Array, *, tile: int, chunk: int = 256) -> jax.Array:
    """Row routing's attention through the straight-through bridge at tile granularity: the end-to-end term's path.

    q: [b, t, heads, d]; k, v: [b, t, kv, d]; first_rows: int [b, h, n, n] (h: routing heads; `tile` where a tile is
    not computed, `block_routing.select_rows`); soft: float [b, h, t, n], the router's differentiable weight of
    (row i, key block j). Forward: exactly `tile_masked_attention(q, k, v, first_rows < tile, first_rows=...)` (the
    multiplier is the hard mask, bit for bit: `router.straight_through`). Backward: ∂L/∂soft(i, j) sums ∂L/∂m over
    block j's causal keys of row i. Unlike `attend`'s bridge, the skipped keys keep their exp(S − max) (the max over
    the visible keys; capped at e^SKIPPED_LOGIT_CAP), so a block that was not computed learns what it would have
    added: the router is told which misses cost the output, not only which computed tiles it could drop.
    Chunked over query rows under `jax.checkpoint`: memory O(chunk · t).
    """
    b, t, heads, d = q.shape
    kv = k.shape[2]
    groups = heads // kv
    h, n = first_rows.shape[1], first_rows.shape[-1]
    chunk = min(chunk, t)
    n_chunks = -(-t // chunk)
    pad = n_chunks * chunk - t
    q_chunks = jnp.moveaxis(jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, n_chunks, chunk, heads, d),
                            1, 0)
    soft_chunks = jnp.moveaxis(jnp.pad(soft, ((0, 0), (0, 0), (0, pad), (0, 0))).reshape(b, h, n_chunks, chunk, n),
                               2, 0)
    positions_k = jnp.arange(t)

    def per_group(mask):  # [b, h, chunk, t] → [b, kv, groups or 1, chunk, t]
        return mask.reshape(b, kv, h // kv, *mask.shape[2:])

    @jax.checkpoint
    def one_chunk(args):
        index, q_chunk, soft_chunk = args
        positions_q = index * chunk + jnp.arange(chunk)
        causal = positions_k[None, :] <= positions_q[:, None]
        visible = rows_visible(first_rows, positions_q, positions_k, tile)
        weight = jnp.take(soft_chunk, positions_k // tile, axis=3).astype(jnp.float32)
        multiplier = straight_through(visible, weight)
        qg = q_chunk.reshape(b, chunk, kv, groups, d)
        scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) / math.sqrt(d)
        top = jax.lax.stop_gradient(jnp.max(jnp.where(per_group(visible), scores, -jnp.inf), axis=-1, keepdims=True))
        shifted = jnp.minimum(jnp.where(causal, scores - top, -jnp.inf), SKIPPED_LOGIT_CAP)
        unnormalized = jnp.exp(shifted) * per_group(multiplier)
        probs = unnormalized / jnp.sum(unnormalized, axis=-1, keepdims=True)
        out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return out.reshape(b, chunk, heads, d).astype(q.dtype)

    outs = jax.lax.map(one_chunk, (jnp.arange(n_chunks), q_chunks, soft_chunks))
    return jnp.moveaxis(outs, 0, 1).reshape(b, n_chunks * chunk, heads, d)[:, :t]
