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
from .masks import SINK, WINDOW, causal_tiles
from .schedule import Schedule, compact

LOG2E = math.log2(math.e)


def transpose_schedule(tile_mask: jax.Array, first_rows: jax.Array | None = None) -> Schedule:
    """tile_mask [B, R, nq, nk] -> for each key tile, the ascending list of causal query tiles
    that compute it: counts [B, R, nk], indices [B, R, nk, nq] (the diagonal, when on, first).

    first_rows: optional [B, R, nq, nk] int, as `build_schedule`'s: the lists then carry each entry's first
    row, the entries that need no in-tile mask first (`plain` of them), then the diagonal and first rows > 0.
    """
    nq, nk = tile_mask.shape[-2:]
    active = jnp.swapaxes(tile_mask & causal_tiles(nq, nk), -1, -2)
    if first_rows is None:
        return compact(active)
    diagonal = jnp.arange(nq)[None, :] == jnp.arange(nk)[:, None]
    return compact(active, masked=(jnp.swapaxes(first_rows, -1, -2) > 0) | diagonal,
                   first_rows=jnp.swapaxes(first_rows, -1, -2))


def _probs(q, k, lse, qpos, kpos, qcode, kcode, *, rule, window, sink, scale, masked, row_ok=None):
    """P = exp(S - lse) for one tile, float32, zero where not visible. row_ok: [rows, 1] bool or None,
    the rows at or below the entry's first row (masked steps only)."""
    s = pltriton.dot(q, k, trans_b=True) * (scale * LOG2E)
    p = jnp.exp2(s - (lse * LOG2E)[:, None])
    if masked:
        vis = _visible(rule, qpos, kpos, qcode, kcode, window, sink)
        if row_ok is not None:
            vis = vis & row_ok
        p = jnp.where(vis, p, 0.0)
    return p


def query_slice(refs, g, rg, start, size, *, has_pos, has_codes):
    """Query rows start … start + size of query head g (routing row rg), from the group-wide refs
    (q, do, lse, delta, query-side positions, query-side codes) → (q, do, lse, delta, qpos, qcode)."""
    q_ref, do_ref, lse_ref, delta_ref, qp_ref, qc_ref = refs
    lse = lse_ref[g, pl.ds(start, size)]
    lse = jnp.where(lse == -jnp.inf, 0.0, lse)  # rows that see nothing: their P is masked to 0 anyway
    qpos = (qp_ref[rg, pl.ds(start, size)][:, None] if has_pos
            else start + lax.broadcasted_iota(jnp.int32, (size, 1), 0))
    qcode = qc_ref[rg, pl.ds(start, size)][:, None] if has_codes else None
    return (q_ref[pl.ds(start, size), g, :], do_ref[pl.ds(start, size), g, :], lse,
            delta_ref[g, pl.ds(start, size)], qpos, qcode)


def key_slice(kp_ref, kc_ref, rg, start, size, *, has_pos, has_codes):
    """Positions [1, size] and codes [1, size] (or None) of keys start … start + size, routing row rg."""
    kpos = (kp_ref[rg, pl.ds(start, size)][None, :] if has_pos
            else start + lax.broadcasted_iota(jnp.int32, (1, size), 1))
    return kpos, (kc_ref[rg, pl.ds(start, size)][None, :] if has_codes else None)


def softmax_delta(o, lse, do, dlse):
    """D = rowsum(dO · O) − dlse: [batch, q_heads, tokens] float32 (the lse cotangent enters as dS += dlse · P)."""
    delta = jnp.einsum("bnhd,bnhd->bhn", o.astype(jnp.float32), do.astype(jnp.float32))
    if dlse is not None:
        delta = delta - jnp.where(jnp.isfinite(lse), dlse, 0.0)
    return delta


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
    has_first_rows=False,
):
    refs = list(refs)
    qc_ref, kc_ref = (refs.pop(0), refs.pop(0)) if has_codes else (None, None)
    qp_ref, kp_ref = (refs.pop(0), refs.pop(0)) if has_pos else (None, None)
    first_ref, plain_ref = (refs.pop(0), refs.pop(0)) if has_first_rows else (None, None)
    (dq_ref,) = refs
    qi = num_q_tiles - 1 - pl.program_id(2)
    count = counts_ref[qi]
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    # Rows that see nothing have lse = -inf; their P is masked to 0, shift them by 0 instead.
    lse = jnp.where(lse == -jnp.inf, 0.0, lse)
    qpos = qp_ref[...][:, None] if has_pos else qi * tile + lax.broadcasted_iota(jnp.int32, (tile, 1), 0)
    qcode = qc_ref[...][:, None] if has_codes else None

    def step(s, dq, masked):
        start = pl.multiple_of(indices_ref[s] * tile, tile)
        k = k_ref[pl.ds(start, tile), :]
        v = v_ref[pl.ds(start, tile), :]
        kpos = kp_ref[pl.ds(start, tile)][None, :] if has_pos else start + lax.broadcasted_iota(jnp.int32, (1, tile), 1)
        kcode = kc_ref[pl.ds(start, tile)][None, :] if has_codes else None
        row_ok = lax.broadcasted_iota(jnp.int32, (tile, 1), 0) >= first_ref[s] if has_first_rows else None
        p = _probs(q, k, lse, qpos, kpos, qcode, kcode, rule=rule, window=window, sink=sink, scale=scale, masked=masked,
                   row_ok=row_ok)
        dp = pltriton.dot(do, v, trans_b=True)
        ds = p * (dp - delta[:, None])
        return dq + pltriton.dot(ds.astype(k.dtype), k)

    dq = jnp.zeros(q.shape, jnp.float32)
    if rule is Rule.TILE:  # only the last listed tile can be the diagonal; with first rows, `plain` need no mask
        last = plain_ref[qi] if has_first_rows else jnp.maximum(count - 1, 0)
        dq = lax.fori_loop(0, last, functools.partial(step, masked=False), dq)
        dq = lax.fori_loop(last, count, functools.partial(step, masked=True), dq)
    else:
        dq = lax.fori_loop(0, count, functools.partial(step, masked=True), dq)
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


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
    query_rows,
    key_rows,
    has_first_rows=False,
):
    refs = list(refs)
    qc_ref, kc_ref = (refs.pop(0), refs.pop(0)) if has_codes else (None, None)
    qp_ref, kp_ref = (refs.pop(0), refs.pop(0)) if has_pos else (None, None)
    first_ref, plain_ref = (refs.pop(0), refs.pop(0)) if has_first_rows else (None, None)
    dk_ref, dv_ref = refs
    sub = pl.program_id(2)  # this program's `key_rows` keys, in key tile sub // (tile // key_rows)
    kj = sub // (tile // key_rows)
    start_k = pl.multiple_of(sub * key_rows, key_rows)
    k, v = k_ref[...], v_ref[...]

    def head(g, carry):
        rg = g if per_q_routing else 0  # routing row of this query head within the block
        count = counts_ref[rg, kj]
        kpos, kcode = key_slice(kp_ref, kc_ref, rg, start_k, key_rows, has_pos=has_pos, has_codes=has_codes)

        def rows(part, carry, tile_start, first, masked):  # `query_rows` queries of the listed tile
            dk, dv = carry
            start = pl.multiple_of(tile_start + part * query_rows, query_rows)
            q, do, lse, delta, qpos, qcode = query_slice(
                (q_ref, do_ref, lse_ref, delta_ref, qp_ref, qc_ref), g, rg, start, query_rows, has_pos=has_pos,
                has_codes=has_codes)
            row_ok = None
            if has_first_rows:  # offsets of these rows in their query tile against the entry's first row
                row_ok = part * query_rows + lax.broadcasted_iota(jnp.int32, (query_rows, 1), 0) >= first
            p = _probs(
                q, k, lse, qpos, kpos, qcode, kcode, rule=rule, window=window, sink=sink, scale=scale, masked=masked,
                row_ok=row_ok,
            )
            dv = dv + pltriton.dot(p.astype(do.dtype), do, trans_a=True)
            dp = pltriton.dot(do, v, trans_b=True)
            ds = p * (dp - delta[:, None])
            dk = dk + pltriton.dot(ds.astype(q.dtype), q, trans_a=True)
            return dk, dv

        def step(s, carry, masked):
            tile_start = pl.multiple_of(indices_ref[rg, s] * tile, tile)
            first = first_ref[rg, s] if has_first_rows else None
            part = functools.partial(rows, tile_start=tile_start, first=first, masked=masked)
            if query_rows == tile:  # the whole tile at once: the program measured on the H100, no inner loop
                return part(0, carry)
            return lax.fori_loop(0, tile // query_rows, part, carry)

        if rule is Rule.TILE and has_first_rows:  # `plain` entries first, then the diagonal and first rows > 0
            plain = plain_ref[rg, kj]
            carry = lax.fori_loop(0, plain, functools.partial(step, masked=False), carry)
            return lax.fori_loop(plain, count, functools.partial(step, masked=True), carry)
        if rule is Rule.TILE:  # only the first listed query tile can be the diagonal
            first = jnp.minimum(count, 1)
            carry = lax.fori_loop(0, first, functools.partial(step, masked=True), carry)
            return lax.fori_loop(first, count, functools.partial(step, masked=False), carry)
        return lax.fori_loop(0, count, functools.partial(step, masked=True), carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, group, head, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


@functools.partial(
    jax.jit,
    static_argnames=(
        "tile", "rule", "window", "sink", "sm_scale", "interpret", "num_warps", "num_stages", "dkv_query_rows",
        "dkv_key_rows",
    ),
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
    window: int | None = WINDOW,
    sink: bool = SINK,
    sm_scale: float | None = None,
    interpret: bool = False,
    num_warps: int | None = None,
    num_stages: int = 2,
    dkv_query_rows: int | None = None,
    dkv_key_rows: int | None = None,
):
    """Gradients of `sparse_attention_forward` (same arguments) w.r.t. q, k, v.

    o, do: [batch, tokens, q_heads, head_dim]; lse, dlse: [batch, q_heads, tokens] float32.
    schedule: the forward's; schedule_t: `transpose_schedule` of the same tile mask (and first rows: both
    carry them, or neither).
    dkv_key_rows, dkv_query_rows: one dk/dv program takes this many keys of a key tile and walks each
    listed query tile this many rows at a time (divisors of tile, >= 16; None: the whole tile, the
    measured default). Smaller slices hold fewer registers: at tile 128 and head dim 128 the whole-tile
    kernel spills 0.9 KB per thread in an offline sm_90 compile (docs/KERNEL_NOTES.md); the H100 speed of
    the smaller ones is not measured yet.
    Returns dq [B, N, Hq, D], dk, dv [B, N, Hkv, D] in the input dtypes.
    """
    b, n, hq, d = q.shape
    hkv = k.shape[2]
    group = hq // hkv
    nq = n // tile
    counts = schedule.counts
    sb, sr = counts.shape[:2]
    has_first_rows = schedule.first_rows is not None
    if has_first_rows != (schedule_t.first_rows is not None):
        raise ValueError("schedule and schedule_t must both carry first rows, or neither")
    scale = d**-0.5 if sm_scale is None else sm_scale
    has_codes = rule in (Rule.CODES, Rule.BUCKET)
    has_pos = positions is not None
    per_q_routing = sr == hq and group > 1
    delta = softmax_delta(o, lse, do, dlse)
    params = pltriton.CompilerParams(num_warps=num_warps or (4 if d <= 64 else 8), num_stages=num_stages)
    common = dict(rule=rule, window=window, sink=sink, tile=tile, scale=scale, has_codes=has_codes, has_pos=has_pos,
                  has_first_rows=has_first_rows)
    ints = [x.astype(jnp.int32) for x, used in ((codes, has_codes), (positions, has_pos)) if used]
    ints = [x for x in ints for _ in range(2)]  # (query side, key side) views of each

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
    count_spec = pl.BlockSpec((None, None, nq), lambda h, bi, i: (*route(bi, h), 0))
    list_spec = pl.BlockSpec((None, None, None, nq), lambda h, bi, i: (*rows(h, bi, i), 0))
    first_specs, first_args = (
        ([list_spec, count_spec], [schedule.first_rows, schedule.plain]) if has_first_rows else ([], []))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, num_q_tiles=nq, **common),
        grid=(hq, b, nq),
        in_specs=[count_spec, list_spec, qspec, kvspec, kvspec, qspec, rowspec, rowspec, *int_specs, *first_specs],
        out_specs=qspec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params,
        interpret=interpret,
        name=f"block_sparse_attention_dq_{rule.value}",
    )(schedule.counts, schedule.indices, q, k, v, do, lse, delta, *ints, *first_args)

    # dk, dv: one program per (KV head, batch, key_rows keys); its query heads are one block of `group`.
    rg = group if per_q_routing else 1
    key_rows = min(dkv_key_rows or tile, tile)
    per_tile = tile // key_rows

    def kroute(bi, kh):
        return (0 if sb == 1 else bi), (0 if sr == 1 else kh)

    kspec = pl.BlockSpec((None, key_rows, None, d), lambda kh, bi, j: (bi, j, kh, 0))
    qgroup = pl.BlockSpec((None, n, group, d), lambda kh, bi, j: (bi, 0, kh, 0))
    rowgroup = pl.BlockSpec((None, group, n), lambda kh, bi, j: (bi, kh, 0))
    int_specs = [pl.BlockSpec((None, rg, n), lambda kh, bi, j: (*kroute(bi, kh), 0))] * len(ints)
    count_spec = pl.BlockSpec((None, rg, nq), lambda kh, bi, j: (*kroute(bi, kh), 0))
    list_spec = pl.BlockSpec((None, rg, None, nq), lambda kh, bi, j: (*kroute(bi, kh), j // per_tile, 0))
    first_specs, first_args = (
        ([list_spec, count_spec], [schedule_t.first_rows, schedule_t.plain]) if has_first_rows else ([], []))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, group=group, per_q_routing=per_q_routing,
                          query_rows=min(dkv_query_rows or tile, tile), key_rows=key_rows, **common),
        grid=(hkv, b, n // key_rows),
        in_specs=[count_spec, list_spec, qgroup, kspec, kspec, qgroup, rowgroup, rowgroup, *int_specs, *first_specs],
        out_specs=[kspec, kspec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=params,
        interpret=interpret,
        name=f"block_sparse_attention_dkv_{rule.value}",
    )(schedule_t.counts, schedule_t.indices, q, k, v, do, lse, delta, *ints, *first_args)
    return dq, dk, dv
