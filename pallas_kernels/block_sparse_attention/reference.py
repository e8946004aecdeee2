"""Plain-JAX float32 oracles for block-sparse causal attention.

Visibility rule (the contract the router relies on), for query token i and key token j of one
routing head r:

    visible(i, j) = j <= i
                    and tile_mask[r, i // tile, j // tile]
                    and i % tile >= first_rows[r, i // tile, j // tile]   (first_rows None: 0)
                    and (codes is None
                         or codes[i] == codes[j]
                         or (sink and j == 0)
                         or (window is not None and i - j <= window)
                         or i == j)

Query head h uses routing head r = h when routing heads == query heads, r = h // (Hq / Hkv) when
routing heads == KV heads. Rows with no visible key give output 0 and lse = -inf.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .masks import SINK, WINDOW, first_row_visible, visible


def routing_head_of(num_q_heads: int, num_routing_heads: int, num_kv_heads: int) -> jax.Array:
    """Routing head index of each query head: [num_q_heads] int32."""
    heads = jnp.arange(num_q_heads, dtype=jnp.int32)
    if num_routing_heads == num_q_heads:
        return heads
    if num_routing_heads == num_kv_heads:
        return heads // (num_q_heads // num_kv_heads)
    raise ValueError(
        f"routing heads {num_routing_heads} must equal query heads {num_q_heads} or KV heads {num_kv_heads}"
    )


def reference_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    *,
    sm_scale: float | None = None,
    return_lse: bool = False,
):
    """Dense masked attention in float32 (highest matmul precision).

    q: [batch, tokens, q_heads, head_dim]; k, v: [batch, keys, kv_heads, head_dim];
    mask: [batch, routing_heads, tokens, keys] bool (routing heads = q heads or kv heads).
    Returns o: [batch, tokens, q_heads, head_dim] float32 (and lse: [batch, q_heads, tokens]).
    """
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    group = hq // hkv
    scale = d**-0.5 if sm_scale is None else sm_scale
    r_of_h = routing_head_of(hq, mask.shape[1], hkv)
    qf = q.astype(jnp.float32).reshape(b, t, hkv, group, d)
    with jax.default_matmul_precision("highest"):
        s = jnp.einsum("btkgd,bskd->bkgts", qf, k.astype(jnp.float32)) * scale
        m = mask[:, r_of_h].reshape(b, hkv, group, t, -1)
        s = jnp.where(m, s, -jnp.inf)
        lse = jax.nn.logsumexp(s, axis=-1)  # -inf on empty rows
        p = jnp.where(m, jnp.exp(s - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None]), 0.0)
        o = jnp.einsum("bkgts,bskd->btkgd", p, v.astype(jnp.float32)).reshape(b, t, hq, d)
    lse = lse.reshape(b, hq, t)
    return (o, lse) if return_lse else o


def chunked_reference_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    tile_mask: jax.Array,
    *,
    tile: int,
    codes: jax.Array | None = None,
    window: int | None = WINDOW,
    sink: bool = SINK,
    sm_scale: float | None = None,
    chunk: int = 512,
    return_lse: bool = False,
    first_rows: jax.Array | None = None,
):
    """`reference_attention` over query chunks, never holding an N x N array (long N).

    Same arguments as `block_sparse_attention`; N must be a multiple of `chunk`.
    Peak memory is chunk x N per head.
    """
    n = q.shape[1]
    if n % chunk:
        raise ValueError(f"tokens {n} must be a multiple of chunk {chunk}")

    def one(start):
        qs = jax.lax.dynamic_slice_in_dim(q, start, chunk, axis=1)
        qpos = start + jnp.arange(chunk, dtype=jnp.int32)[:, None]
        kpos = jnp.arange(n, dtype=jnp.int32)[None, :]
        tiles = jnp.take(jnp.take(tile_mask, qpos[:, 0] // tile, axis=2), kpos[0] // tile, axis=3)
        if first_rows is not None:
            tiles = tiles & first_row_visible(first_rows, qpos, kpos, tile=tile)
        if codes is None:
            vis = tiles & visible(qpos, kpos, window=window, sink=sink)
        else:
            qc = jax.lax.dynamic_slice_in_dim(codes, start, chunk, axis=2)
            vis = tiles & visible(qpos, kpos, qc[..., None], codes[:, :, None, :], window=window, sink=sink)
        return reference_attention(qs, k, v, vis, sm_scale=sm_scale, return_lse=True)

    starts = jnp.arange(0, n, chunk, dtype=jnp.int32)
    o, lse = jax.lax.map(one, starts)  # [chunks, b, chunk, h, d], [chunks, b, h, chunk]
    o = jnp.moveaxis(o, 0, 1).reshape(q.shape)
    lse = jnp.moveaxis(lse, 0, 2).reshape(q.shape[0], q.shape[2], n)
    return (o, lse) if return_lse else o
