"""Block-sparse causal attention forward: the portable Pallas kernel (Triton lowering).

One program per (query head, batch, query tile). It walks the schedule's list of active key tiles
for its (batch, routing head, query tile) with an online softmax in float32, so work is
proportional to the active tiles and a skipped tile is never loaded or tested. K and V keep their
own (fewer) heads: query head h reads KV head h // (Hq / Hkv), and the query heads of one group run
in adjacent programs, so a K/V tile is fetched from HBM once and served to the group from L2.

The same kernel runs four token rules inside a computed tile (`Rule`), so the code-sorted bucket
pass and the banded window pass of METHOD.md §9 are this kernel with other data.
"""

from __future__ import annotations

import enum
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from .masks import SINK, WINDOW, local_rule
from .schedule import Schedule

LOG2E = math.log2(math.e)


class Rule(enum.Enum):
    """Which token pairs of a computed tile are visible (always also causal: kpos <= qpos).

    TILE:   all of them (the diagonal tile applies causality only).
    CODES:  equal codes, or the sink / window / diagonal rules (the public codes semantics).
    LOCAL:  only the sink / window / diagonal rules (the banded pass of METHOD.md §9).
    BUCKET: equal codes and NOT the sink / window / diagonal rules (the code-sorted pass; its keys
            and LOCAL's are disjoint, so their log-sum-exp merge counts every key once).
    """

    TILE = "tile"
    CODES = "codes"
    LOCAL = "local"
    BUCKET = "bucket"


def _visible(rule: Rule, qpos, kpos, qcode, kcode, window, sink):
    vis = kpos <= qpos
    if rule is Rule.CODES:
        vis = vis & ((qcode == kcode) | local_rule(qpos, kpos, window=window, sink=sink))
    elif rule is Rule.LOCAL:
        vis = vis & local_rule(qpos, kpos, window=window, sink=sink)
    elif rule is Rule.BUCKET:
        vis = vis & (qcode == kcode) & ~local_rule(qpos, kpos, window=window, sink=sink)
    return vis


def _kernel(
    counts_ref,
    indices_ref,
    q_ref,
    k_ref,
    v_ref,
    *refs,
    rule: Rule,
    window,
    sink,
    tile: int,
    num_q_tiles: int,
    scale: float,
    has_codes: bool,
    has_pos: bool,
    has_first_rows: bool = False,
):
    refs = list(refs)
    qc_ref, kc_ref = (refs.pop(0), refs.pop(0)) if has_codes else (None, None)
    qp_ref, kp_ref = (refs.pop(0), refs.pop(0)) if has_pos else (None, None)
    first_ref, plain_ref = (refs.pop(0), refs.pop(0)) if has_first_rows else (None, None)
    o_ref, lse_ref = refs[-2:]  # poisoned (aliased) output buffers, if any, sit in between

    qi = num_q_tiles - 1 - pl.program_id(2)  # heaviest query tiles are launched first
    count = counts_ref[qi]
    q = q_ref[...]
    if has_pos:
        qpos = qp_ref[...][:, None]
    else:
        qpos = qi * tile + lax.broadcasted_iota(jnp.int32, (tile, 1), 0)
    qcode = qc_ref[...][:, None] if has_codes else None

    def step(s, carry, masked: bool):
        acc, m, denom = carry
        start = pl.multiple_of(indices_ref[s] * tile, tile)
        k = k_ref[pl.ds(start, tile), :]
        v = v_ref[pl.ds(start, tile), :]
        # Scores in float32 (fp16 Q.K overflows otherwise), in the log2 domain for exp2.
        sc = pltriton.dot(q, k, trans_b=True) * (scale * LOG2E)
        if masked:
            if has_pos:
                kpos = kp_ref[pl.ds(start, tile)][None, :]
            else:
                kpos = start + lax.broadcasted_iota(jnp.int32, (1, tile), 1)
            kcode = kc_ref[pl.ds(start, tile)][None, :] if has_codes else None
            vis = _visible(rule, qpos, kpos, qcode, kcode, window, sink)
            if has_first_rows:  # rows above this entry's first row do not see its key tile
                vis = vis & (lax.broadcasted_iota(jnp.int32, (tile, 1), 0) >= first_ref[s])
            sc = jnp.where(vis, sc, -jnp.inf)
        m_new = jnp.maximum(m, sc.max(axis=-1))
        # A row with nothing visible yet keeps m = -inf; shift by 0 there so exp2 gives 0, not NaN.
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
        alpha = jnp.exp2(m - m_use)
        p = jnp.exp2(sc - m_use[:, None])
        denom = denom * alpha + p.sum(axis=-1)
        acc = acc * alpha[:, None] + pltriton.dot(p.astype(v.dtype), v)
        return acc, m_new, denom

    d = q.shape[-1]
    carry = (
        jnp.zeros((tile, d), jnp.float32),
        jnp.full((tile,), -jnp.inf, jnp.float32),
        jnp.zeros((tile,), jnp.float32),
    )
    if rule is Rule.TILE:
        # Only the last listed tile can be the diagonal one (lists are ascending, and padding
        # keys sit in the last diagonal tile only), so all others run without a mask. With first
        # rows, the schedule lists the tiles that need no mask first, `plain` of them.
        last = plain_ref[qi] if has_first_rows else jnp.maximum(count - 1, 0)
        carry = lax.fori_loop(0, last, functools.partial(step, masked=False), carry)
        carry = lax.fori_loop(last, count, functools.partial(step, masked=True), carry)
    else:
        carry = lax.fori_loop(0, count, functools.partial(step, masked=True), carry)
    acc, m, denom = carry
    empty = denom == 0.0
    o_ref[...] = (acc / jnp.where(empty, 1.0, denom)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, -jnp.inf, (m + jnp.log2(jnp.where(empty, 1.0, denom))) / LOG2E)


@functools.partial(
    jax.jit,
    static_argnames=(
        "tile",
        "rule",
        "window",
        "sink",
        "sm_scale",
        "out_dtype",
        "interpret",
        "num_warps",
        "num_stages",
        "poison",
    ),
)
def sparse_attention_forward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    schedule: Schedule,
    *,
    tile: int,
    rule: Rule = Rule.TILE,
    codes: jax.Array | None = None,
    positions: jax.Array | None = None,
    window: int | None = WINDOW,
    sink: bool = SINK,
    sm_scale: float | None = None,
    out_dtype=None,
    interpret: bool = False,
    num_warps: int | None = None,
    num_stages: int = 3,
    poison: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Run the kernel over a prebuilt schedule. Tokens must be a multiple of `tile`.

    q: [batch, tokens, q_heads, head_dim]; k, v: [batch, tokens, kv_heads, head_dim].
    schedule: counts [B', R', q_tiles], indices [B', R', q_tiles, k_tiles] (B' in {1, batch},
    R' in {1, routing heads}: a size-1 axis is shared by all batches / heads); with first rows
    (`build_schedule(tile_mask, first_rows)`) also first_rows [B', R', q_tiles, k_tiles] and plain
    [B', R', q_tiles]: the query rows of a tile above an entry's first row do not see its keys.
    codes: [B', R', tokens] int32 (rules CODES, BUCKET). positions: [B', R', tokens] int32, the
    original position of each token when the sequence is permuted (BUCKET); iota otherwise.
    poison: write into NaN-filled output buffers (tests: every row must be written).
    Returns o: [batch, tokens, q_heads, head_dim] (out_dtype, default q.dtype) and
    lse: [batch, q_heads, tokens] float32 (natural log; -inf on rows with no visible key).
    """
    b, n, hq, d = q.shape
    hkv = k.shape[2]
    group = hq // hkv
    nq = n // tile
    if n % tile or k.shape[1] != n:
        raise ValueError(f"tokens {n} must be a multiple of tile {tile}, and k must match")
    counts, indices, first_rows, plain = schedule
    sb, sr = counts.shape[:2]
    if sr not in (1, hq, hkv):
        raise ValueError(f"schedule routing heads {sr} must be 1, {hq} or {hkv}")
    scale = d**-0.5 if sm_scale is None else sm_scale
    has_codes = rule in (Rule.CODES, Rule.BUCKET)
    has_pos = positions is not None
    if has_codes and codes is None:
        raise ValueError(f"rule {rule} needs codes")

    def route(bi, h):
        """(batch, routing head) block index of the schedule/codes for query head h."""
        r = 0 if sr == 1 else (h if sr == hq else h // group)
        return (0 if sb == 1 else bi), r

    def rows(h, bi, i):
        return (*route(bi, h), nq - 1 - i)

    in_specs = [
        pl.BlockSpec((None, None, nq), lambda h, bi, i: (*route(bi, h), 0)),
        pl.BlockSpec((None, None, None, indices.shape[-1]), lambda h, bi, i: (*rows(h, bi, i), 0)),
        pl.BlockSpec((None, tile, None, d), lambda h, bi, i: (bi, nq - 1 - i, h, 0)),
        pl.BlockSpec((None, n, None, d), lambda h, bi, i: (bi, 0, h // group, 0)),
        pl.BlockSpec((None, n, None, d), lambda h, bi, i: (bi, 0, h // group, 0)),
    ]
    args = [counts, indices, q, k, v]
    for extra, used in ((codes, has_codes), (positions, has_pos)):
        if used:
            in_specs += [
                pl.BlockSpec((None, None, tile), rows),
                pl.BlockSpec((None, None, n), lambda h, bi, i: (*route(bi, h), 0)),
            ]
            args += [extra.astype(jnp.int32)] * 2
    has_first_rows = first_rows is not None
    if has_first_rows:
        in_specs += [in_specs[1], in_specs[0]]  # first rows laid out as the indices, plain as the counts
        args += [first_rows, plain]

    out_dtype = q.dtype if out_dtype is None else out_dtype
    out_shape = [jax.ShapeDtypeStruct(q.shape, out_dtype), jax.ShapeDtypeStruct((b, hq, n), jnp.float32)]
    out_specs = [
        pl.BlockSpec((None, tile, None, d), lambda h, bi, i: (bi, nq - 1 - i, h, 0)),
        pl.BlockSpec((None, None, tile), lambda h, bi, i: (bi, h, nq - 1 - i)),
    ]
    aliases = {}
    if poison:
        aliases = {len(args): 0, len(args) + 1: 1}
        args += [jnp.full(x.shape, jnp.nan, x.dtype) for x in out_shape]
        in_specs += out_specs

    kernel = functools.partial(
        _kernel,
        rule=rule,
        window=window,
        sink=sink,
        tile=tile,
        num_q_tiles=nq,
        scale=scale,
        has_codes=has_codes,
        has_pos=has_pos,
        has_first_rows=has_first_rows,
    )
    return pl.pallas_call(
        kernel,
        grid=(hq, b, nq),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=pltriton.CompilerParams(
            num_warps=num_warps if num_warps is not None else (4 if d <= 64 else 8), num_stages=num_stages
        ),
        interpret=interpret,
        name=f"block_sparse_attention_{rule.value}",
    )(*args)
