"""Block-sparse causal attention backward: dq, dk, dv over the forward's schedule (Triton lowering).

Two kernels, both walking lists of active tiles, both GQA-native:
- dq: one program per (query head, batch, query tile), over the forward's key-tile list;
- dk/dv: one program per (KV head, batch, key tile), over the transposed list (the query tiles
  whose list holds this key tile), looping over the query heads of its group, so dk and dv are
  summed over the group in registers and written once (no atomics, no repeated K/V).
P is recomputed from the saved log-sum-exp. The lse output is differentiable too: its cotangent
enters as dS += dlse * P, i.e. delta = rowsum(dO * O) - dlse, which is what lets the
code-sorted bucket/window merge (through lse) train exactly.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from .forward import Rule, _visible
from .route_gradient import SoftMask, agreement_grads
from .schedule import Schedule, causal_tiles, compact

LOG2E = math.log2(math.e)


def transpose_schedule(tile_mask: jax.Array) -> Schedule:
    """tile_mask [B, R, nq, nk] -> for each key tile, the ascending list of causal query tiles
    that compute it: counts [B, R, nk], indices [B, R, nk, nq] (the diagonal, when on, first)."""
    nq, nk = tile_mask.shape[-2:]
    return compact(jnp.swapaxes(tile_mask & causal_tiles(nq, nk), -1, -2))


def _probs(q, k, lse, qpos, kpos, qcode, kcode, *, rule, window, sink, scale, masked):
    """P = exp(S - lse) for one tile, float32, zero where not visible."""
    s = pltriton.dot(q, k, trans_b=True) * (scale * LOG2E)
    p = jnp.exp2(s - (lse * LOG2E)[:, None])
    if masked:
        p = jnp.where(_visible(rule, qpos, kpos, qcode, kcode, window, sink), p, 0.0)
    return p


def _route_columns(routes_ref, row, start, tile, soft):
    """[level][choice] → [tile] float32 route probabilities of tokens start … start + tile (routes_ref:
    [rows, levels · choices, tokens], or [levels · choices, tokens] with row None); [] without a soft mask."""
    if not soft:
        return []
    lead = () if row is None else (row,)
    return [[routes_ref[(*lead, u * soft.choices + c, pl.ds(start, tile))] for c in range(soft.choices)]
            for u in range(soft.levels)]


def _zero_routes(tile, soft):
    return tuple(jnp.zeros((tile,), jnp.float32) for _ in range(soft.levels * soft.choices)) if soft else ()


def _store_routes(out_ref, row, d_routes):
    """out_ref: [rows, levels · choices, tile] (or without rows when row is None) ← the per-column sums."""
    lead = () if row is None else (row,)
    for index, d_route in enumerate(d_routes):
        out_ref[(*lead, index, slice(None))] = d_route


def _dq_kernel(
    counts_ref,
    indices_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    *refs,
    rule,
    window,
    sink,
    tile,
    num_q_tiles,
    scale,
    has_codes,
    has_pos,
    soft,
):
    refs = list(refs)
    qc_ref, kc_ref = (refs.pop(0), refs.pop(0)) if has_codes else (None, None)
    qp_ref, kp_ref = (refs.pop(0), refs.pop(0)) if has_pos else (None, None)
    routes_ref = refs.pop(0) if soft else None
    dq_ref, *dr_ref = refs
    qi = num_q_tiles - 1 - pl.program_id(2)
    count = counts_ref[qi]
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    # Rows that see nothing have lse = -inf; their P is masked to 0, shift them by 0 instead.
    lse = jnp.where(lse == -jnp.inf, 0.0, lse)
    qpos = qp_ref[...][:, None] if has_pos else qi * tile + lax.broadcasted_iota(jnp.int32, (tile, 1), 0)
    qcode = qc_ref[...][:, None] if has_codes else None
    row_routes = _route_columns(routes_ref, None, qi * tile, tile, soft)

    def step(s, carry, masked):
        dq, d_routes = carry
        start = pl.multiple_of(indices_ref[s] * tile, tile)
        k = k_ref[pl.ds(start, tile), :]
        v = v_ref[pl.ds(start, tile), :]
        kpos = kp_ref[pl.ds(start, tile)][None, :] if has_pos else start + lax.broadcasted_iota(jnp.int32, (1, tile), 1)
        kcode = kc_ref[pl.ds(start, tile)][None, :] if has_codes else None
        p = _probs(q, k, lse, qpos, kpos, qcode, kcode, rule=rule, window=window, sink=sink, scale=scale, masked=masked)
        dp = pltriton.dot(do, v, trans_b=True)
        ds = p * (dp - delta[:, None])
        if soft:  # the router's query side: Σ_j ∂L/∂M_u[i, j] r[j, u, c]
            col_routes = _route_columns(routes_ref, None, start, tile, soft)
            d_routes = list(d_routes)
            for u, grad in agreement_grads(ds, lambda u, c: row_routes[u][c], lambda u, c: col_routes[u][c], soft):
                for c in range(soft.choices):
                    d_routes[u * soft.choices + c] += jnp.sum(grad * col_routes[u][c][None, :], axis=1)
            d_routes = tuple(d_routes)
        return dq + pltriton.dot(ds.astype(k.dtype), k), d_routes

    carry = jnp.zeros(q.shape, jnp.float32), _zero_routes(tile, soft)
    if rule is Rule.TILE:  # only the last listed tile can be the diagonal
        last = jnp.maximum(count - 1, 0)
        carry = lax.fori_loop(0, last, functools.partial(step, masked=False), carry)
        carry = lax.fori_loop(last, count, functools.partial(step, masked=True), carry)
    else:
        carry = lax.fori_loop(0, count, functools.partial(step, masked=True), carry)
    dq, d_routes = carry
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)
    if soft:
        _store_routes(dr_ref[0], None, d_routes)


def _dkv_kernel(
    counts_ref,
    indices_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    *refs,
    rule,
    window,
    sink,
    tile,
    scale,
    group,
    per_q_routing,
    has_codes,
    has_pos,
    soft,
    routes_per_q,
):
    refs = list(refs)
    qc_ref, kc_ref = (refs.pop(0), refs.pop(0)) if has_codes else (None, None)
    qp_ref, kp_ref = (refs.pop(0), refs.pop(0)) if has_pos else (None, None)
    routes_ref = refs.pop(0) if soft else None
    dk_ref, dv_ref, *dr_ref = refs
    kj = pl.program_id(2)
    start_k = pl.multiple_of(kj * tile, tile)
    k, v = k_ref[...], v_ref[...]

    def head(g, carry):
        rg = g if per_q_routing else 0  # routing row of this query head within the block
        route_row = g if routes_per_q else 0  # this query head's routes within the block
        col_routes = _route_columns(routes_ref, route_row, start_k, tile, soft)
        if routes_per_q:  # this head's own routes: a fresh sum, stored after its loop
            carry = (*carry[:2], _zero_routes(tile, soft))
        count = counts_ref[rg, kj]
        kcode = kc_ref[rg, pl.ds(start_k, tile)][None, :] if has_codes else None
        kpos = (
            kp_ref[rg, pl.ds(start_k, tile)][None, :]
            if has_pos
            else start_k + lax.broadcasted_iota(jnp.int32, (1, tile), 1)
        )

        def step(s, carry, masked):
            dk, dv, d_routes = carry
            start = pl.multiple_of(indices_ref[rg, s] * tile, tile)
            q = q_ref[pl.ds(start, tile), g, :]
            do = do_ref[pl.ds(start, tile), g, :]
            lse = lse_ref[g, pl.ds(start, tile)]
            lse = jnp.where(lse == -jnp.inf, 0.0, lse)
            delta = delta_ref[g, pl.ds(start, tile)]
            qpos = (
                qp_ref[rg, pl.ds(start, tile)][:, None]
                if has_pos
                else start + lax.broadcasted_iota(jnp.int32, (tile, 1), 0)
            )
            qcode = qc_ref[rg, pl.ds(start, tile)][:, None] if has_codes else None
            p = _probs(
                q, k, lse, qpos, kpos, qcode, kcode, rule=rule, window=window, sink=sink, scale=scale, masked=masked
            )
            dv = dv + pltriton.dot(p.astype(do.dtype), do, trans_a=True)
            dp = pltriton.dot(do, v, trans_b=True)
            ds = p * (dp - delta[:, None])
            dk = dk + pltriton.dot(ds.astype(q.dtype), q, trans_a=True)
            if soft:  # the router's key side: Σ_i ∂L/∂M_u[i, j] r[i, u, c]
                row_routes = _route_columns(routes_ref, route_row, start, tile, soft)
                d_routes = list(d_routes)
                for u, grad in agreement_grads(ds, lambda u, c: row_routes[u][c], lambda u, c: col_routes[u][c], soft):
                    for c in range(soft.choices):
                        d_routes[u * soft.choices + c] += jnp.sum(grad * row_routes[u][c][:, None], axis=0)
                d_routes = tuple(d_routes)
            return dk, dv, d_routes

        if rule is Rule.TILE:  # only the first listed query tile can be the diagonal
            first = jnp.minimum(count, 1)
            carry = lax.fori_loop(0, first, functools.partial(step, masked=True), carry)
            carry = lax.fori_loop(first, count, functools.partial(step, masked=False), carry)
        else:
            carry = lax.fori_loop(0, count, functools.partial(step, masked=True), carry)
        if routes_per_q:
            _store_routes(dr_ref[0], g, carry[2])
        return carry

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv, d_routes = lax.fori_loop(0, group, head, (zeros, zeros, _zero_routes(tile, soft)))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
    if soft and not routes_per_q:  # one route for the whole group: summed over its query heads
        _store_routes(dr_ref[0], 0, d_routes)


@functools.partial(
    jax.jit,
    static_argnames=("tile", "rule", "window", "sink", "sm_scale", "interpret", "num_warps", "num_stages", "soft_mask"),
)
def sparse_attention_backward(
    q,
    k,
    v,
    o,
    lse,
    do,
    dlse,
    schedule: Schedule,
    schedule_t: Schedule,
    *,
    tile: int,
    rule: Rule = Rule.TILE,
    codes=None,
    positions=None,
    window: int | None = 0,
    sink: bool = True,
    sm_scale: float | None = None,
    interpret: bool = False,
    num_warps: int | None = None,
    num_stages: int = 2,
    routes=None,
    soft_mask: SoftMask | None = None,
):
    """Gradients of `sparse_attention_forward` (same arguments) w.r.t. q, k, v, and optionally routes.

    o, do: [batch, tokens, q_heads, head_dim]; lse, dlse: [batch, q_heads, tokens] float32.
    schedule: the forward's; schedule_t: `transpose_schedule` of the same tile mask.
    routes: [batch, R, levels · choices, tokens] float32 (R = q_heads or kv_heads) with soft_mask: the
    router's gradient through the straight-through mask (`route_gradient.py`), on computed tiles only.
    Returns dq [B, N, Hq, D], dk, dv [B, N, Hkv, D] in the input dtypes, and d_routes (routes' shape,
    float32) or None.
    """
    b, n, hq, d = q.shape
    hkv = k.shape[2]
    group = hq // hkv
    nq = n // tile
    counts, _ = schedule
    sb, sr = counts.shape[:2]
    scale = d**-0.5 if sm_scale is None else sm_scale
    has_codes = rule in (Rule.CODES, Rule.BUCKET)
    has_pos = positions is not None
    per_q_routing = sr == hq and group > 1
    delta = jnp.einsum("bnhd,bnhd->bhn", o.astype(jnp.float32), do.astype(jnp.float32))
    if dlse is not None:
        delta = delta - jnp.where(jnp.isfinite(lse), dlse, 0.0)
    params = pltriton.CompilerParams(num_warps=num_warps or (4 if d <= 64 else 8), num_stages=num_stages)
    common = dict(rule=rule, window=window, sink=sink, tile=tile, scale=scale, has_codes=has_codes, has_pos=has_pos)
    ints = [x.astype(jnp.int32) for x, used in ((codes, has_codes), (positions, has_pos)) if used]
    ints = [x for x in ints for _ in range(2)]  # (query side, key side) views of each
    soft = soft_mask if routes is not None else None
    common["soft"] = soft
    route_rows = routes.shape[1] if soft else 0
    routes_per_q = route_rows == hq and group > 1
    columns = routes.shape[2] if soft else 0

    # dq: the forward's grid and lists.
    def route(bi, h):
        return (0 if sb == 1 else bi), (0 if sr == 1 else (h if sr == hq else h // group))

    def rows(h, bi, i):
        return (*route(bi, h), nq - 1 - i)

    qspec = pl.BlockSpec((None, tile, None, d), lambda h, bi, i: (bi, nq - 1 - i, h, 0))
    kvspec = pl.BlockSpec((None, n, None, d), lambda h, bi, i: (bi, 0, h // group, 0))
    rowspec = pl.BlockSpec((None, None, tile), lambda h, bi, i: (bi, h, nq - 1 - i))
    int_specs = [
        pl.BlockSpec((None, None, tile), rows),
        pl.BlockSpec((None, None, n), lambda h, bi, i: (*route(bi, h), 0)),
    ] * (len(ints) // 2)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, num_q_tiles=nq, **common),
        grid=(hq, b, nq),
        in_specs=[
            pl.BlockSpec((None, None, nq), lambda h, bi, i: (*route(bi, h), 0)),
            pl.BlockSpec((None, None, None, nq), lambda h, bi, i: (*rows(h, bi, i), 0)),
            qspec,
            kvspec,
            kvspec,
            qspec,
            rowspec,
            rowspec,
            *int_specs,
            *([pl.BlockSpec((None, None, columns, n), lambda h, bi, i: (bi, h if routes_per_q else h // group, 0, 0))]
              if soft else []),
        ],
        out_specs=[qspec, *([pl.BlockSpec((None, None, columns, tile), lambda h, bi, i: (bi, h, 0, nq - 1 - i))]
                            if soft else [])],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   *([jax.ShapeDtypeStruct((b, hq, columns, n), jnp.float32)] if soft else [])],
        compiler_params=params,
        interpret=interpret,
        name=f"block_sparse_attention_dq_{rule.value}",
    )(*schedule, q, k, v, do, lse, delta, *ints, *([routes] if soft else []))
    dq, d_routes_q = dq[0], dq[1:]

    # dk, dv: one program per (KV head, batch, key tile); its query heads are one block of `group`.
    rg = group if per_q_routing else 1

    def kroute(bi, kh):
        return (0 if sb == 1 else bi), (0 if sr == 1 else kh)

    kspec = pl.BlockSpec((None, tile, None, d), lambda kh, bi, j: (bi, j, kh, 0))
    qgroup = pl.BlockSpec((None, n, group, d), lambda kh, bi, j: (bi, 0, kh, 0))
    rowgroup = pl.BlockSpec((None, group, n), lambda kh, bi, j: (bi, kh, 0))
    int_specs = [pl.BlockSpec((None, rg, n), lambda kh, bi, j: (*kroute(bi, kh), 0))] * len(ints)
    per_head_routes = group if routes_per_q else 1
    route_spec = pl.BlockSpec((None, per_head_routes, columns, n), lambda kh, bi, j: (bi, kh, 0, 0))
    d_route_spec = pl.BlockSpec((None, per_head_routes, columns, tile), lambda kh, bi, j: (bi, kh, 0, j))
    dk, dv, *d_routes_k = pl.pallas_call(
        functools.partial(_dkv_kernel, group=group, per_q_routing=per_q_routing, routes_per_q=routes_per_q, **common),
        grid=(hkv, b, nq),
        in_specs=[
            pl.BlockSpec((None, rg, nq), lambda kh, bi, j: (*kroute(bi, kh), 0)),
            pl.BlockSpec((None, rg, None, nq), lambda kh, bi, j: (*kroute(bi, kh), j, 0)),
            qgroup,
            kspec,
            kspec,
            qgroup,
            rowgroup,
            rowgroup,
            *int_specs,
            *([route_spec] if soft else []),
        ],
        out_specs=[kspec, kspec, *([d_route_spec] if soft else [])],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype),
                   *([jax.ShapeDtypeStruct(routes.shape, jnp.float32)] if soft else [])],
        compiler_params=params,
        interpret=interpret,
        name=f"block_sparse_attention_dkv_{rule.value}",
    )(*schedule_t, q, k, v, do, lse, delta, *ints, *([routes] if soft else []))
    if not soft:
        return dq, dk, dv, None
    # The query side came per query head; one route per KV head sums its group.
    d_routes_q = d_routes_q[0].reshape(b, route_rows, hq // route_rows, columns, n).sum(axis=2)
    return dq, dk, dv, d_routes_q + d_routes_k[0]
