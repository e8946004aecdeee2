"""Public entry points: tile-mask attention, and exact token-level routing through code sorting."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from .backward import sparse_attention_backward, transpose_schedule
from .forward import Rule, sparse_attention_forward
from .forward_hopper import hopper_attention_forward, hopper_supported
from .masks import SINK, WINDOW, band_tiles, sorted_bucket_tiles
from .route_gradient import SoftMask, route_gradient_backward
from .schedule import build_schedule

DEFAULT_TILE = 128
BACKENDS = ("auto", "triton", "hopper")


class _Config(NamedTuple):
    """Static settings of one attention call (hashable: a custom_vjp non-diff argument)."""

    tile: int
    rule: Rule
    window: int | None
    sink: bool
    sm_scale: float | None
    interpret: bool
    num_warps: int | None
    num_stages: int
    backend: str  # "triton" or "hopper", resolved
    poison: bool = False
    soft_mask: SoftMask | None = None  # with routes: the router's gradient kernels run in the backward


def _forward(q, k, v, sched, extras, cfg: _Config):
    codes, positions = extras
    if cfg.backend == "hopper":
        return hopper_attention_forward(q, k, v, sched, sm_scale=cfg.sm_scale)
    return sparse_attention_forward(
        q,
        k,
        v,
        sched,
        tile=cfg.tile,
        rule=cfg.rule,
        codes=codes,
        positions=positions,
        window=cfg.window,
        sink=cfg.sink,
        sm_scale=cfg.sm_scale,
        interpret=cfg.interpret,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        poison=cfg.poison,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _attention(q, k, v, routes, sched, sched_t, extras, cfg: _Config):
    """(o, lse) of the kernels, differentiable in q, k, v (and routes, [B, R, levels · choices, N] or None)
    through the backward kernels. The forward never reads routes: it runs the hard mask."""
    del routes, sched_t  # only the backward reads them
    return _forward(q, k, v, sched, extras, cfg)


def _attention_fwd(q, k, v, routes, sched, sched_t, extras, cfg):
    o, lse = _forward(q, k, v, sched, extras, cfg)
    return (o, lse), (q, k, v, routes, o, lse, sched, sched_t, extras)


def _attention_bwd(cfg, res, cotangents):
    q, k, v, routes, o, lse, sched, sched_t, extras = res
    do, dlse = cotangents
    codes, positions = extras
    dq, dk, dv = sparse_attention_backward(
        q,
        k,
        v,
        o,
        lse,
        do.astype(q.dtype),
        dlse,
        sched,
        sched_t,
        tile=cfg.tile,
        rule=cfg.rule,
        codes=codes,
        positions=positions,
        window=cfg.window,
        sink=cfg.sink,
        sm_scale=cfg.sm_scale,
        interpret=cfg.interpret,
        num_warps=cfg.num_warps,
    )
    d_routes = None
    if routes is not None:
        d_routes = route_gradient_backward(
            q, k, v, o, lse, do.astype(q.dtype), dlse, routes, sched, sched_t, tile=cfg.tile, rule=cfg.rule,
            soft_mask=cfg.soft_mask, codes=codes, positions=positions, window=cfg.window, sink=cfg.sink,
            sm_scale=cfg.sm_scale, interpret=cfg.interpret)
    return dq, dk, dv, d_routes, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def _resolve_backend(backend: str, q, tile: int, rule: Rule, interpret: bool) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    hopper_ok = rule is Rule.TILE and not interpret and hopper_supported(q, tile)
    if backend == "hopper" and not hopper_ok:
        raise ValueError("the hopper backend needs a compute capability 9.x GPU, tile 128, no codes")
    if backend == "auto":
        return "hopper" if hopper_ok else "triton"
    return backend


def _default_interpret(interpret: bool | None) -> bool:
    return jax.default_backend() == "cpu" if interpret is None else interpret


def _check_shapes(q, k, v, tile, interpret):
    if q.ndim != 4 or k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(f"expected q [B, N, Hq, D], k = v [B, N, Hkv, D]; got {q.shape}, {k.shape}, {v.shape}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} must be a multiple of KV heads {k.shape[2]}")
    # float32 only where the caller asks for interpret mode explicitly: tight oracle tests on CPU. The
    # GPU kernels are written and measured for bf16 / fp16.
    dtypes = (jnp.bfloat16, jnp.float16, jnp.float32) if interpret is True else (jnp.bfloat16, jnp.float16)
    if q.dtype not in dtypes or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share dtype bfloat16 or float16 (float32 with interpret=True); "
                         f"got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[3] not in (64, 128):
        raise ValueError(f"head dim must be 64 or 128, got {q.shape[3]}")
    if tile & (tile - 1) or tile < 16:
        raise ValueError(f"tile must be a power of two >= 16, got {tile}")


def _pad_tokens(x, n_pad, axis, value=0):
    if n_pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, n_pad)
    return jnp.pad(x, widths, constant_values=value)


@functools.partial(
    jax.jit,
    static_argnames=(
        "tile",
        "window",
        "sink",
        "sm_scale",
        "return_lse",
        "interpret",
        "num_warps",
        "num_stages",
        "poison",
        "backend",
        "soft_mask",
    ),
)
def block_sparse_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    tile_mask: jax.Array,
    *,
    tile: int = DEFAULT_TILE,
    codes: jax.Array | None = None,
    window: int | None = WINDOW,
    sink: bool = SINK,
    sm_scale: float | None = None,
    return_lse: bool = False,
    interpret: bool | None = None,
    num_warps: int | None = None,
    num_stages: int = 3,
    poison: bool = False,
    backend: str = "auto",
    routes: jax.Array | None = None,
    soft_mask: SoftMask | None = None,
    first_rows: jax.Array | None = None,
):
    """Causal attention over the tiles of `tile_mask`, with an optional exact token rule inside.

    q: [batch, tokens, q_heads, head_dim]; k, v: [batch, tokens, kv_heads, head_dim] (GQA, never
    repeated); bf16 or fp16 (float32 with interpret=True, for oracle tests); head_dim 64 or 128;
    any token count (padded inside to the tile).
    tile_mask: [batch, routing_heads, n_tiles, n_tiles] bool, n_tiles = ceil(tokens / tile),
    routing_heads = q_heads or kv_heads. Tiles above the diagonal are ignored (causal).
    codes: optional [batch, routing_heads, tokens] int. Key j is visible to query i iff
    j <= i, the tile (i // tile, j // tile) is on, and (codes is None, or codes[i] == codes[j], or
    (sink and j == 0), or (window is not None and i - j <= window), or i == j). The sink / window
    / diagonal rules act only inside tiles that are on: OR in `masks.band_tiles` for them.
    first_rows: optional [batch, routing_heads, n_tiles, n_tiles] int32, the layout of tile_mask, read
    only where a tile is on (row routing with a prefix union, METHOD.md §12): tile (b, j) with first row
    s is seen only by the query rows i of block b with i % tile >= s (s <= 0: all of them, as None;
    s >= tile: none); the rules above apply on top. A row that then sees no key gets o = 0, lse = -inf.
    None runs exactly the kernels without first rows.
    Returns o: [batch, tokens, q_heads, head_dim] in q's dtype, and with return_lse the
    log-sum-exp lse: [batch, q_heads, tokens] float32 (-inf, with o = 0, on rows that see no key).
    backend: "auto" (Mosaic GPU wgmma/TMA kernel on compute capability 9.x for tile masks without
    codes, the Triton-lowered kernel otherwise), "triton" or "hopper". num_warps / num_stages:
    Triton launch parameters; poison: NaN-fill the outputs first (tests, Triton kernel).
    Differentiable in q, k, v (and through lse): the backward runs block-sparse kernels too.
    routes: optional [batch, routing_heads, tokens, levels, choices] float32 route probabilities with
    soft_mask: the forward ignores them; the backward gives their gradient through the router's
    straight-through soft mask, on the computed tiles (`route_gradient.py`); not with first_rows yet.
    """
    _check_shapes(q, k, v, tile, interpret)
    b, n, hq, _ = q.shape
    nt = -(-n // tile)
    if tile_mask.shape[-2:] != (nt, nt) or tile_mask.shape[1] not in (hq, k.shape[2]):
        raise ValueError(f"tile_mask {tile_mask.shape} must be [{b}, {hq} or {k.shape[2]}, {nt}, {nt}]")
    if first_rows is not None:
        if first_rows.shape != tile_mask.shape or first_rows.dtype != jnp.int32:
            raise ValueError(f"first_rows must be int32 of tile_mask's shape {tile_mask.shape}; got {first_rows.dtype} "
                             f"{first_rows.shape}")
        if routes is not None:
            raise NotImplementedError("the router's gradient kernels (routes, soft_mask) do not read first_rows yet")
    routes = _kernel_routes(routes, soft_mask, (b, tile_mask.shape[1], n), nt * tile)
    pad = nt * tile - n
    # Padding keys sit after every real query, so causality alone hides them.
    q, k, v = (_pad_tokens(x, pad, 1) for x in (q, k, v))
    if codes is not None:
        codes = _pad_tokens(codes.astype(jnp.int32), pad, 2, value=-1)
    interpret = _default_interpret(interpret)
    rule = Rule.TILE if codes is None else Rule.CODES
    backend = "triton" if poison else _resolve_backend(backend, q, tile, rule, interpret)
    cfg = _Config(tile, rule, window, sink, sm_scale, interpret, num_warps, num_stages, backend, poison, soft_mask)
    schedules = build_schedule(tile_mask, first_rows), transpose_schedule(tile_mask, first_rows)
    o, lse = _attention(q, k, v, routes, *schedules, (codes, None), cfg)
    o, lse = o[:, :n], lse[..., :n]
    return (o, lse) if return_lse else o


def _kernel_routes(routes, soft_mask, lead, padded):
    """Router routes [B, R, N, levels, choices] → the kernels' [B, R, levels · choices, padded N] float32
    (padding tokens route nowhere: zeros), checked against soft_mask; None passes through."""
    if routes is None:
        return None
    if soft_mask is None:
        raise ValueError("routes need soft_mask (d_max, temperature, levels, choices) to define their gradient")
    expected = (*lead, soft_mask.levels, soft_mask.choices)
    if routes.shape != expected:
        raise ValueError(f"routes {routes.shape} must be {expected} (batch, routing heads, tokens, levels, choices)")
    b, r, n = lead
    routes = _pad_tokens(routes.astype(jnp.float32), padded - n, 2)
    return jnp.moveaxis(routes, 2, -1).reshape(b, r, -1, padded)


def merge_partials(o1: jax.Array, lse1: jax.Array, o2: jax.Array, lse2: jax.Array, out_dtype=None):
    """Exact softmax merge of two attentions over disjoint key sets.

    o*: [batch, tokens, heads, head_dim]; lse*: [batch, heads, tokens] (natural log, -inf = empty).
    Returns (o, lse) as if one softmax had run over the union of the keys.
    """
    lse = jnp.logaddexp(lse1, lse2)
    safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    w1 = jnp.swapaxes(jnp.exp(lse1 - safe), 1, 2)[..., None]
    w2 = jnp.swapaxes(jnp.exp(lse2 - safe), 1, 2)[..., None]
    o = w1 * o1.astype(jnp.float32) + w2 * o2.astype(jnp.float32)
    return o.astype(out_dtype or o1.dtype), lse


def _gather_tokens(x, perm, group):
    """x: [B, N, H, D] gathered per routing head along tokens by perm: [B, R, N].
    With R == H / group (per-KV-head routing) each routing head permutes its `group` heads."""
    b, n, h, d = x.shape
    r = perm.shape[1]
    if r * group != h:  # per-query-head routing of K/V: one permuted copy per routing head
        x = jnp.repeat(x, r * group // h, axis=2)
    x = x.reshape(b, n, r, group, d)
    idx = jnp.swapaxes(perm, 1, 2)[:, :, :, None, None]
    return jnp.take_along_axis(x, idx, axis=1).reshape(b, n, r * group, d)


def _sorted_passes(codes: jax.Array, tile: int, window: int | None, sink: bool):
    """Padded codes [B, R, n_tiles · tile] → (permutation, sorted codes, bucket-pass tile mask [B, R, nt, nt],
    band-pass tile mask [1, 1, nt, nt]): exactly the two tile masks `token_routed_attention` runs."""
    perm = jnp.argsort(codes, axis=-1, stable=True).astype(jnp.int32)  # (code, position) order
    sorted_codes = jnp.take_along_axis(codes, perm, axis=-1)
    bucket = sorted_bucket_tiles(sorted_codes, tile=tile)
    local = band_tiles(codes.shape[-1] // tile, tile=tile, window=window, sink=sink)[None, None]
    return perm, sorted_codes, bucket, local


def token_routed_tiles(codes: jax.Array, *, tile: int = DEFAULT_TILE, window: int | None = WINDOW,
                       sink: bool = SINK) -> tuple[jax.Array, jax.Array]:
    """codes: [B, R, N] → the bucket-pass and band-pass tile masks that `token_routed_attention` gives its
    kernels for these codes (the executed tiles that reports count)."""
    n = codes.shape[-1]
    pad = -(-n // tile) * tile - n
    codes = _pad_tokens(codes.astype(jnp.int32), pad, 2, value=jnp.iinfo(jnp.int32).max)
    _, _, bucket, local = _sorted_passes(codes, tile, window, sink)
    return bucket, local


@functools.partial(
    jax.jit,
    static_argnames=(
        "tile", "window", "sink", "sm_scale", "return_lse", "interpret", "num_warps", "num_stages", "soft_mask"
    ),
)
def token_routed_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    codes: jax.Array,
    *,
    tile: int = DEFAULT_TILE,
    window: int | None = WINDOW,
    sink: bool = SINK,
    sm_scale: float | None = None,
    return_lse: bool = False,
    interpret: bool | None = None,
    num_warps: int | None = None,
    num_stages: int = 3,
    routes: jax.Array | None = None,
    soft_mask: SoftMask | None = None,
):
    """Exact token-level routing, fast (METHOD.md §9): the same function as
    `block_sparse_attention(q, k, v, all_tiles_on, codes=codes, ...)`.

    Per routing head, tokens are sorted by (code, position); the bucket pass runs over the
    permuted sequence, where each code is a contiguous run and its tiles are near-dense; the
    sink / window / diagonal pass runs banded in original order; the two (disjoint key sets) merge
    by log-sum-exp and the bucket result is un-permuted. Work follows token density, not the
    coherence of codes inside a tile.

    q: [B, N, Hq, D]; k, v: [B, N, Hkv, D]; codes: [B, R, N] int, R = Hq or Hkv. Routing per KV
    head keeps one permutation for the GQA group and never copies K/V per query head; routing
    per query head needs one permuted K/V copy per query head for the bucket pass.
    routes, soft_mask: as `block_sparse_attention` (the router's gradient from both passes' backward).
    """
    _check_shapes(q, k, v, tile, interpret)
    b, n, hq, d = q.shape
    hkv = k.shape[2]
    r = codes.shape[1]
    if codes.shape != (b, r, n) or r not in (hq, hkv):
        raise ValueError(f"codes {codes.shape} must be [{b}, {hq} or {hkv}, {n}]")
    interpret = _default_interpret(interpret)
    cfg = _Config(tile, Rule.BUCKET, window, sink, sm_scale, interpret, num_warps, num_stages, "triton",
                  soft_mask=soft_mask)
    nt = -(-n // tile)
    routes = _kernel_routes(routes, soft_mask, (b, r, n), nt * tile)
    pad = nt * tile - n
    q, k, v = (_pad_tokens(x, pad, 1) for x in (q, k, v))
    # Padding tokens get a code of their own, sorted last: no real token shares it.
    codes = _pad_tokens(codes.astype(jnp.int32), pad, 2, value=jnp.iinfo(jnp.int32).max)

    perm, sorted_codes, bucket, local = _sorted_passes(codes, tile, window, sink)
    sorted_routes = None if routes is None else jnp.take_along_axis(routes, perm[:, :, None, :], axis=-1)
    q_group = hq // r
    qs = _gather_tokens(q, perm, q_group)
    ks, vs = (_gather_tokens(x, perm, 1) for x in (k, v))
    o1, lse1 = _attention(qs, ks, vs, sorted_routes, build_schedule(bucket), transpose_schedule(bucket),
                          (sorted_codes, perm), cfg)
    # Un-permute: the inverse permutation gathers each token back to its position.
    inv = jnp.argsort(perm, axis=-1).astype(jnp.int32)
    o1 = _gather_tokens(o1, inv, q_group)
    lse1 = jnp.take_along_axis(lse1, jnp.repeat(inv, q_group, axis=1), axis=-1)

    o2, lse2 = _attention(
        q, k, v, routes, build_schedule(local), transpose_schedule(local), (None, None), cfg._replace(rule=Rule.LOCAL)
    )
    o, lse = merge_partials(o1, lse1, o2, lse2)
    o, lse = o[:, :n], lse[..., :n]
    return (o, lse) if return_lse else o
