"""The router's gradient in the backward pass, on computed tiles only (METHOD.md §5): two kernels.

The routed attention multiplies the scores by a straight-through mask: forward the hard mask, backward
the soft mask σ((d_max − d) / T) of the soft tree distance d of two tokens' routes. For a visible pair
∂L/∂m_ij is the softmax-score gradient dS_ij that the backward kernels already hold, so the router's
gradient is computed where dS is, tile by tile, and never as an N × N array:

    M_u[i, j] = Σ_c r[i, u, c] r[j, u, c]                  agreement at level u (root = L − 1)
    d_ij      = L − Σ_ℓ min_{u ≥ ℓ} M_u[i, j]              soft tree distance
    ∂L/∂d_ij  = −dS_ij σ (1 − σ) / T
    ∂L/∂M_u   = −∂L/∂d · (number of suffix minima that level u attains)
    ∂L/∂r[i, u, c] += Σ_j ∂L/∂M_u[i, j] r[j, u, c]         (query side)
    ∂L/∂r[j, u, c] += Σ_i ∂L/∂M_u[i, j] r[i, u, c]         (key side)

Ties go to the level nearest the leaves, as `llama_surgery_jax.router.tree_distance`'s VJP (with one-hot
routes every minimum ties). One pass root → leaves finds the minima and keeps, per pair, the set of
levels that take the minimum over as the bits of one int32; a pass leaves → root turns it into counts.
Every product is elementwise float32 (no tensor-core rounding), so the result equals the chunked JAX
route gradient up to summation order.

Two kernels over the attention's own schedule, beside the dq and dk/dv kernels: the query side (one
program per query head and sub-tile of `rows` queries, over the forward's key-tile list, `cols` keys at a
time) and the key side (one program per KV head and sub-tile of `rows` keys, over the transposed list,
`cols` queries at a time, summing its GQA group). Each recomputes P and dS of its [rows, cols] slices
(two extra small matmuls per slice). Why not inside dq and dk/dv, where dS already is: there the
[tile, tile] float32 arrays of the tree distance come on top of the gradient accumulators, and an offline
compile for sm_90 (pip triton 3.9 and its ptxas, tile 128, head dim 128, L = 13, p = 2) spilled 12 to
14 KB per thread and the dk/dv kernel needed 263 KB of shared memory, over the H100's 227 KB. These two,
at rows 16, cols 32, 4 warps, spill 20 bytes and use 27 KB (docs/KERNEL_NOTES.md).

Routes travel as [batch, routing heads, levels · choices, tokens] float32 (a column per (level, choice)
is one contiguous load of a sub-tile's tokens).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from .backward import _probs, key_slice, query_slice, softmax_delta
from .forward import Rule
from .masks import SINK, WINDOW
from .schedule import Schedule


class SoftMask(NamedTuple):
    """Static description of the straight-through soft mask (hashable: a kernel parameter)."""

    d_max: float
    temperature: float
    levels: int
    choices: int


def agreement_grads(ds, row_route, col_route, soft: SoftMask):
    """Yield (level u, ∂L/∂M_u [rows, cols]) for one tile, leaves first.

    ds: [rows, cols] float32, ∂L/∂m (zero where the pair is not visible); row_route(u, c) → [rows] and
    col_route(u, c) → [cols] float32: route probabilities of the tile's query and key tokens.
    """
    def agreement(u):
        total = None
        for c in range(soft.choices):
            term = row_route(u, c)[:, None] * col_route(u, c)[None, :]
            total = term if total is None else total + term
        return total

    # Root → leaves: suffix minima and their sum; bit u set when level u takes the minimum over.
    running = agreement(soft.levels - 1)
    shared = running
    takes_over = jnp.full(ds.shape, 1 << (soft.levels - 1), jnp.int32)
    for u in reversed(range(soft.levels - 1)):
        level = agreement(u)
        takes_over = takes_over | jnp.where(level <= running, 1 << u, 0)
        running = jnp.minimum(running, level)
        shared = shared + running
    distance = soft.levels - shared
    sigma = 1.0 / (1.0 + jnp.exp((distance - soft.d_max) / soft.temperature))
    d_distance = -ds * sigma * (1.0 - sigma) / soft.temperature

    # Leaves → root: a level that takes over is the minimum of every suffix from itself down to the next
    # level below that takes over.
    last = jnp.full(ds.shape, -1, jnp.int32)
    for u in range(soft.levels):
        on = (takes_over & (1 << u)) != 0
        count = jnp.where(on, u - last, 0)
        last = jnp.where(on, u, last)
        yield u, -d_distance * count.astype(jnp.float32)


def _accumulate(d_routes, ds, row_route, col_route, soft, axis):
    """d_routes (levels · choices sums) += the tile's ∂L/∂M_u contracted with the other side's routes."""
    other = col_route if axis == 1 else row_route
    d_routes = list(d_routes)
    for u, grad in agreement_grads(ds, row_route, col_route, soft):
        for c in range(soft.choices):
            side = other(u, c)[None, :] if axis == 1 else other(u, c)[:, None]
            d_routes[u * soft.choices + c] += jnp.sum(grad * side, axis=axis)
    return tuple(d_routes)


def _query_side_kernel(counts_ref, indices_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs,
                       rule, window, sink, tile, rows, cols, sub_tiles, scale, has_codes, has_pos, soft):
    refs = list(refs)
    qc_ref, kc_ref = (refs.pop(0), refs.pop(0)) if has_codes else (None, None)
    qp_ref, kp_ref = (refs.pop(0), refs.pop(0)) if has_pos else (None, None)
    routes_ref, out_ref = refs
    sub = sub_tiles - 1 - pl.program_id(2)  # longest rows first
    start_q = sub * rows
    count = counts_ref[sub // (tile // rows)]
    q, do = q_ref[...], do_ref[...]
    lse = lse_ref[...]
    lse = jnp.where(lse == -jnp.inf, 0.0, lse)
    delta = delta_ref[...]
    qpos = qp_ref[...][:, None] if has_pos else start_q + lax.broadcasted_iota(jnp.int32, (rows, 1), 0)
    qcode = qc_ref[...][:, None] if has_codes else None
    width = soft.choices

    def chunk(part, d_routes, tile_start):  # `cols` keys of the tile at a time: small register footprint
        start = pl.multiple_of(tile_start + part * cols, cols)
        k = k_ref[pl.ds(start, cols), :]
        v = v_ref[pl.ds(start, cols), :]
        kpos = kp_ref[pl.ds(start, cols)][None, :] if has_pos else start + lax.broadcasted_iota(jnp.int32, (1, cols), 1)
        kcode = kc_ref[pl.ds(start, cols)][None, :] if has_codes else None
        p = _probs(q, k, lse, qpos, kpos, qcode, kcode, rule=rule, window=window, sink=sink, scale=scale, masked=True)
        ds = p * (pltriton.dot(do, v, trans_b=True) - delta[:, None])
        return _accumulate(d_routes, ds, lambda u, c: routes_ref[u * width + c, pl.ds(start_q, rows)],
                           lambda u, c: routes_ref[u * width + c, pl.ds(start, cols)], soft, axis=1)

    def step(s, d_routes):
        tile_start = pl.multiple_of(indices_ref[s] * tile, tile)
        return lax.fori_loop(0, tile // cols, functools.partial(chunk, tile_start=tile_start), d_routes)

    zeros = tuple(jnp.zeros((rows,), jnp.float32) for _ in range(soft.levels * width))
    for index, d_route in enumerate(lax.fori_loop(0, count, step, zeros)):
        out_ref[index, :] = d_route


def _key_side_kernel(counts_ref, indices_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs,
                     rule, window, sink, tile, rows, cols, scale, group, per_q_schedule, per_q_routes, has_codes,
                     has_pos, soft):
    refs = list(refs)
    qc_ref, kc_ref = (refs.pop(0), refs.pop(0)) if has_codes else (None, None)
    qp_ref, kp_ref = (refs.pop(0), refs.pop(0)) if has_pos else (None, None)
    routes_ref, out_ref = refs
    sub = pl.program_id(2)
    start_k = sub * rows
    k, v = k_ref[...], v_ref[...]
    width = soft.choices
    zeros = tuple(jnp.zeros((rows,), jnp.float32) for _ in range(soft.levels * width))

    def head(g, d_routes):
        rg = g if per_q_schedule else 0  # schedule / codes row of this query head within the block
        rr = g if per_q_routes else 0  # routes row
        count = counts_ref[rg, sub // (tile // rows)]
        kpos, kcode = key_slice(kp_ref, kc_ref, rg, start_k, rows, has_pos=has_pos, has_codes=has_codes)

        def chunk(part, d_routes, tile_start):  # `cols` queries of the tile at a time
            start = pl.multiple_of(tile_start + part * cols, cols)
            q, do, lse, delta, qpos, qcode = query_slice(
                (q_ref, do_ref, lse_ref, delta_ref, qp_ref, qc_ref), g, rg, start, cols, has_pos=has_pos,
                has_codes=has_codes)
            p = _probs(q, k, lse, qpos, kpos, qcode, kcode, rule=rule, window=window, sink=sink, scale=scale,
                       masked=True)
            ds = p * (pltriton.dot(do, v, trans_b=True) - delta[:, None])
            return _accumulate(d_routes, ds, lambda u, c: routes_ref[rr, u * width + c, pl.ds(start, cols)],
                               lambda u, c: routes_ref[rr, u * width + c, pl.ds(start_k, rows)], soft, axis=0)

        def step(s, d_routes):
            tile_start = pl.multiple_of(indices_ref[rg, s] * tile, tile)
            return lax.fori_loop(0, tile // cols, functools.partial(chunk, tile_start=tile_start), d_routes)

        if not per_q_routes:  # one route for the group: its query heads add up
            return lax.fori_loop(0, count, step, d_routes)
        for index, d_route in enumerate(lax.fori_loop(0, count, step, zeros)):
            out_ref[g, index, :] = d_route
        return d_routes

    d_routes = lax.fori_loop(0, group, head, zeros)
    if not per_q_routes:
        for index, d_route in enumerate(d_routes):
            out_ref[0, index, :] = d_route


@functools.partial(jax.jit, static_argnames=("tile", "rule", "window", "sink", "sm_scale", "soft_mask", "interpret",
                                             "rows", "cols", "num_warps"))
def route_gradient_backward(q, k, v, o, lse, do, dlse, routes, schedule: Schedule, schedule_t: Schedule, *,
                            tile: int, rule: Rule, soft_mask: SoftMask, codes=None, positions=None,
                            window: int | None = WINDOW, sink: bool = SINK, sm_scale: float | None = None,
                            interpret: bool = False, rows: int = 16, cols: int = 32, num_warps: int = 4):
    """∂L/∂routes through the straight-through soft mask, for the attention of `sparse_attention_forward`
    with the same arguments (see `sparse_attention_backward` for q … dlse, schedule, schedule_t).

    routes: [batch, R, levels · choices, tokens] float32, R = q_heads or kv_heads → the same shape.
    rows: queries (query side) or keys (key side) per program; cols: keys (query side) or queries (key side)
    per inner step; both divisors of tile, ≥ 16 (tensor-core shapes). [rows, cols] float32 slices keep the
    tree distance's per-pair state in registers.
    """
    b, n, hq, d = q.shape
    hkv = k.shape[2]
    group = hq // hkv
    nq = n // tile
    rows, cols = min(rows, tile), min(cols, tile)
    sub_tiles = n // rows
    counts = schedule.counts
    sb, sr = counts.shape[:2]
    route_rows, columns = routes.shape[1], routes.shape[2]
    per_q_schedule = sr == hq and group > 1
    per_q_routes = route_rows == hq and group > 1
    scale = d**-0.5 if sm_scale is None else sm_scale
    has_codes = rule in (Rule.CODES, Rule.BUCKET)
    has_pos = positions is not None
    delta = softmax_delta(o, lse, do, dlse)
    params = pltriton.CompilerParams(num_warps=num_warps, num_stages=1)
    common = dict(rule=rule, window=window, sink=sink, tile=tile, rows=rows, cols=cols, scale=scale,
                  has_codes=has_codes, has_pos=has_pos, soft=soft_mask)
    ints = [x.astype(jnp.int32) for x, used in ((codes, has_codes), (positions, has_pos)) if used]

    # Query side: per query head (a KV-head route sums its group afterwards).
    def route(bi, h):
        return (0 if sb == 1 else bi), (0 if sr == 1 else (h if sr == hq else h // group))

    def sub_index(i):
        return sub_tiles - 1 - i

    qspec = pl.BlockSpec((None, rows, None, d), lambda h, bi, i: (bi, sub_index(i), h, 0))
    kvspec = pl.BlockSpec((None, n, None, d), lambda h, bi, i: (bi, 0, h // group, 0))
    rowspec = pl.BlockSpec((None, None, rows), lambda h, bi, i: (bi, h, sub_index(i)))
    int_specs = [pl.BlockSpec((None, None, rows), lambda h, bi, i: (*route(bi, h), sub_index(i))),
                 pl.BlockSpec((None, None, n), lambda h, bi, i: (*route(bi, h), 0))] * len(ints)
    per_tile = tile // rows
    d_routes_q = pl.pallas_call(
        functools.partial(_query_side_kernel, sub_tiles=sub_tiles, **common),
        grid=(hq, b, sub_tiles),
        in_specs=[
            pl.BlockSpec((None, None, nq), lambda h, bi, i: (*route(bi, h), 0)),
            pl.BlockSpec((None, None, None, nq), lambda h, bi, i: (*route(bi, h), sub_index(i) // per_tile, 0)),
            qspec, kvspec, kvspec, qspec, rowspec, rowspec, *int_specs,
            pl.BlockSpec((None, None, columns, n), lambda h, bi, i: (bi, h if per_q_routes else h // group, 0, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, columns, rows), lambda h, bi, i: (bi, h, 0, sub_index(i))),
        out_shape=jax.ShapeDtypeStruct((b, hq, columns, n), jnp.float32),
        compiler_params=params,
        interpret=interpret,
        name=f"route_gradient_queries_{rule.value}",
    )(schedule.counts, schedule.indices, q, k, v, do, lse, delta, *[x for x in ints for _ in range(2)], routes)
    d_routes_q = d_routes_q.reshape(b, route_rows, hq // route_rows, columns, n).sum(axis=2)

    # Key side: per KV head, its group's query heads in one program.
    rg = group if per_q_schedule else 1
    rr = group if per_q_routes else 1

    def kroute(bi, kh):
        return (0 if sb == 1 else bi), (0 if sr == 1 else kh)

    kspec = pl.BlockSpec((None, rows, None, d), lambda kh, bi, j: (bi, j, kh, 0))
    qgroup = pl.BlockSpec((None, n, group, d), lambda kh, bi, j: (bi, 0, kh, 0))
    rowgroup = pl.BlockSpec((None, group, n), lambda kh, bi, j: (bi, kh, 0))
    int_specs = [pl.BlockSpec((None, rg, n), lambda kh, bi, j: (*kroute(bi, kh), 0))] * (2 * len(ints))
    d_routes_k = pl.pallas_call(
        functools.partial(_key_side_kernel, group=group, per_q_schedule=per_q_schedule, per_q_routes=per_q_routes,
                          **common),
        grid=(hkv, b, sub_tiles),
        in_specs=[
            pl.BlockSpec((None, rg, nq), lambda kh, bi, j: (*kroute(bi, kh), 0)),
            pl.BlockSpec((None, rg, None, nq), lambda kh, bi, j: (*kroute(bi, kh), j // per_tile, 0)),
            qgroup, kspec, kspec, qgroup, rowgroup, rowgroup, *int_specs,
            pl.BlockSpec((None, rr, columns, n), lambda kh, bi, j: (bi, kh, 0, 0)),
        ],
        out_specs=pl.BlockSpec((None, rr, columns, rows), lambda kh, bi, j: (bi, kh, 0, j)),
        out_shape=jax.ShapeDtypeStruct(routes.shape, jnp.float32),
        compiler_params=params,
        interpret=interpret,
        name=f"route_gradient_keys_{rule.value}",
    )(schedule_t.counts, schedule_t.indices, q, k, v, do, lse, delta, *[x for x in ints for _ in range(2)], routes)
    return d_routes_q + d_routes_k
