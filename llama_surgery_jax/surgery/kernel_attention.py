"""The routed attention of METHOD.md §5 run by the block-sparse kernels: the fast training path.

Same function and same gradients as `masked_attention.masked_attention` (the oracle), never an N × N
array:

    forward   o, lse = the kernel over the exact hard mask (codes + sink / window / diagonal)
    backward  dq, dk, dv: the kernels' backward (custom_vjp in `pallas_kernels`)
              d routes:  per query chunk, recompute P = exp(S − lse) on the hard mask, then
                         dS = P ⊙ (dO Vᵀ − D), D_i = Σ_j P_ij (dO Vᵀ)_ij, and pull dS back through the soft mask

Why dS is the mask's gradient. masked_attention computes A = (E ⊙ m) / Σ_s (E ⊙ m) with E = exp(S − max S)
on the hard mask (no ε: the row maximum is visible, so the sum is ≥ 1; §5's ε plays no role). With
m = hard in the forward pass, P := A is the masked softmax and

    ∂L/∂m_ij = E_ij (dA_ij − Σ_s A_is dA_is) / Σ_s E_is = P_ij (dO_i · v_j − dO_i · O_i) = dS_ij,

zero wherever the hard mask is 0 (P = 0 there). The straight-through mask passes it unchanged to the
soft mask σ((d_max − d)/T_m), d = tree_distance(routes_i, routes_j), whose VJP gives both the query-side
and the key-side route gradients. Routing per KV head sums dS over the query heads of a group.

Which kernel runs the forward (measured, docs/KERNEL_NOTES.md): for token routing the code-sorted
`token_routed_attention` (bucket pass + band pass, merged by lse). The tile-OR schedule of the same codes
is fully dense once the codes of a tile spread (block density 1.000 for random codes; 1.6× slower at
8k / 4 codes, 6.6× at 32k / 16 codes), while the sorted passes follow token density. In block mode every
token of a block shares its block's code, so the tile-OR mask is exact and already block-sparse: there
`block_sparse_attention` with the tile mask and codes runs it, with no sorting or gathers.

Two ways to the router gradient (`RouterExecution.router_gradient`):
- "chunked" (default, measured on the H100): `route_gradient` below, plain JAX over query chunks of
  `RouterExecution.query_chunk` rows against all keys: memory O(chunk · N), compute O(N²) elementwise.
- "fused": Pallas kernels beside the attention's backward compute it on the computed tiles only, from
  both passes of the sorted execution (each visible pair lies in exactly one pass, and each pass's dS is
  the global one: P / w · (w dP − w D) with w the pass's merge weight). `pallas_kernels/.../
  route_gradient.py`. Checked against this module's oracle in interpret mode; its GPU run is pending.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from llama_surgery_jax.surgery.config import RouterConfig, RouterExecution
from llama_surgery_jax.surgery.mask import tile_mask, token_mask
from llama_surgery_jax.surgery.router import soft_mask, tree_distance

KERNEL_HEAD_DIMS = (64, 128)
KERNEL_DTYPES = (jnp.bfloat16, jnp.float16)


def kernel_tile(tile: int) -> bool:
    """Whether the kernels can tile blocks of `tile` tokens: a power of two from 16 (the MMA shape) up."""
    return tile >= 16 and not tile & (tile - 1)


def kernel_applies(dtype, head_dim: int, tile: int = 128) -> bool:
    """Whether the GPU kernels take these activations: head dim 64 or 128, bf16 or fp16, a kernel tile. A
    float32 model stays on the reference: the kernels would round it to bf16, which float32 never does."""
    return head_dim in KERNEL_HEAD_DIMS and jnp.dtype(dtype) in KERNEL_DTYPES and kernel_tile(tile)


def resolve_backend(backend: str, dtype, head_dim: int, tile: int = 128) -> str:
    """The one rule for training, prefill and decode: 'auto' → 'kernel' on a GPU when `kernel_applies`,
    else 'reference'; the others as given."""
    if backend != "auto":
        return backend
    return "kernel" if jax.default_backend() == "gpu" and kernel_applies(dtype, head_dim, tile) else "reference"


class _Settings(NamedTuple):
    """Static (hashable) settings of one call."""

    config: RouterConfig
    execution: RouterExecution
    interpret: bool | None  # None: interpret mode on CPU, compiled kernels on GPU


def kernel_forward(q: jax.Array, k: jax.Array, v: jax.Array, codes: jax.Array, *, config: RouterConfig,
                   interpret: bool | None = None, routes: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """The hard-mask attention on the kernels, differentiable in q, k, v (kernel backward).

    q: [b, t, heads, d]; k, v: [b, t, kv_heads, d]; codes: [b, h, t] int (h = heads or kv_heads)
    → o [b, t, heads, d] in q's dtype, lse [b, heads, t] float32 (natural log).
    routes: optional [b, h, t, l, c] float32; the forward ignores them, and the backward kernels give
    their gradient through the straight-through soft mask (the "fused" router gradient).
    """
    from pallas_kernels import SoftMask, block_sparse_attention, token_routed_attention

    # Resolved here rather than by the kernels: an explicit interpret=True is what lets float32 through
    # (CPU oracle tests), and on CPU interpret mode is the only way the kernels run.
    interpret = jax.default_backend() == "cpu" if interpret is None else interpret
    kwargs = dict(tile=config.block_size, window=config.window, sink=config.sink, return_lse=True,
                  interpret=interpret)
    if routes is not None:
        kwargs.update(routes=routes, soft_mask=SoftMask(float(config.d_max), config.soft_mask_temperature,
                                                        config.levels, config.p))

    if config.mode == "token":
        return token_routed_attention(q, k, v, codes, **kwargs)
    tiles = tile_mask(codes, tile=config.block_size, window=config.window, sink=config.sink)
    return block_sparse_attention(q, k, v, tiles, codes=codes, **kwargs)


def route_gradient(q: jax.Array, k: jax.Array, v: jax.Array, lse: jax.Array, do: jax.Array,
                   codes: jax.Array, routes: jax.Array, *, config: RouterConfig,
                   execution: RouterExecution = RouterExecution()) -> jax.Array:
    """∂L/∂routes of the straight-through mask, chunked over queries (never an N × N array).

    q, do: [b, t, heads, d]; k, v: [b, t, kv_heads, d]; lse: [b, heads, t] float32; codes: [b, h, t];
    routes: [b, h, t, l, c] float32 → [b, h, t, l, c] float32. Scores are recomputed as the oracle computes
    them (inputs in their dtype, float32 accumulation); memory per chunk O(chunk · t · (heads + levels)).
    """
    b, t, heads, d = q.shape
    kv = k.shape[2]
    groups = heads // kv
    h = codes.shape[1]
    chunk = min(execution.query_chunk, t)
    n_chunks = -(-t // chunk)
    pad = n_chunks * chunk - t

    def chunks(x, axis):  # → [n_chunks, ..., chunk, ...] with the chunk axis where `axis` was
        x = jnp.pad(x, [(0, pad) if a == axis else (0, 0) for a in range(x.ndim)])
        x = x.reshape(*x.shape[:axis], n_chunks, chunk, *x.shape[axis + 1:])
        return jnp.moveaxis(x, axis, 0)

    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)  # empty rows have P = 0 anyway
    xs = (jnp.arange(n_chunks), chunks(q, 1), chunks(do, 1), chunks(lse, 2), chunks(codes, 2), chunks(routes, 2))
    positions_k = jnp.arange(t)

    def one_chunk(d_routes_k, args):
        index, q_c, do_c, lse_c, codes_c, routes_c = args
        positions_q = index * chunk + jnp.arange(chunk)
        hard = token_mask(codes_c, codes, positions_q, positions_k, window=config.window, sink=config.sink)
        hard = hard & (positions_q < t)[:, None]  # padded rows teach nothing
        hard = hard.reshape(b, kv, h // kv, chunk, t)  # per routing head → per KV group
        qg = q_c.reshape(b, chunk, kv, groups, d)
        scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) / math.sqrt(d)
        probs = jnp.where(hard, jnp.exp(scores - lse_c.reshape(b, kv, groups, chunk)[..., None]), 0.0)
        d_probs = jnp.einsum("btkgd,bskd->bkgts", do_c.reshape(b, chunk, kv, groups, d), v,
                             preferred_element_type=jnp.float32)
        # D_i = Σ_j P_ij dP_ij in float32 over the chunk's whole rows, not dO_i · O_i: O is rounded to the input
        # type, and an error in D shifts every dS of the row the same way, a bias the router would learn from.
        delta = jnp.sum(probs * d_probs, axis=-1, keepdims=True)
        d_scores = probs * (d_probs - delta)
        d_mask = d_scores.reshape(b, heads, chunk, t) if h == heads else jnp.sum(d_scores, axis=2)
        _, pullback = jax.vjp(
            lambda rq, rk: soft_mask(tree_distance(rq, rk), d_max=config.d_max,
                                     temperature=config.soft_mask_temperature), routes_c, routes)
        d_routes_q, d_routes_k_chunk = pullback(d_mask)
        return d_routes_k + d_routes_k_chunk, d_routes_q

    d_routes_k, d_routes_q = jax.lax.scan(one_chunk, jnp.zeros_like(routes), xs)
    d_routes_q = jnp.moveaxis(d_routes_q, 0, 2).reshape(*routes.shape[:2], n_chunks * chunk, *routes.shape[3:])
    return d_routes_k + d_routes_q[:, :, :t]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _routed(q, k, v, codes, routes, settings: _Settings):
    del routes  # forward: the hard mask alone (the straight-through mask equals it exactly)
    return kernel_forward(q, k, v, codes, config=settings.config, interpret=settings.interpret)[0]


def _routed_fwd(q, k, v, codes, routes, settings):
    # Only the inputs are kept, as the reference's per-chunk checkpoint keeps them: the backward runs the
    # forward kernels again. Keeping their residuals instead (the sorted passes hold permuted copies of
    # q, k, v and two partial outputs) would cost ~6 × |q| per layer, 24 GB at 16k tokens on Llama 3.1 8B.
    return _routed(q, k, v, codes, routes, settings), (q, k, v, codes, routes)


def _routed_bwd(settings, residuals, do):
    q, k, v, codes, routes = residuals
    if settings.execution.router_gradient == "fused":  # one backward: the kernels give d_routes with dq, dk, dv
        (_, lse), pullback = jax.vjp(
            lambda q, k, v, routes: kernel_forward(q, k, v, codes, config=settings.config,
                                                   interpret=settings.interpret, routes=routes), q, k, v, routes)
        dq, dk, dv, d_routes = pullback((do, jnp.zeros_like(lse)))
        return dq, dk, dv, None, d_routes
    (_, lse), pullback = jax.vjp(
        lambda q, k, v: kernel_forward(q, k, v, codes, config=settings.config, interpret=settings.interpret),
        q, k, v)
    dq, dk, dv = pullback((do, jnp.zeros_like(lse)))
    d_routes = route_gradient(q, k, v, lse, do, codes, routes, config=settings.config,
                              execution=settings.execution)
    return dq, dk, dv, None, d_routes


_routed.defvjp(_routed_fwd, _routed_bwd)


def kernel_routed_attention(q: jax.Array, k: jax.Array, v: jax.Array, codes: jax.Array,
                            routes: jax.Array | None = None, *, config: RouterConfig,
                            execution: RouterExecution = RouterExecution(),
                            interpret: bool | None = None) -> jax.Array:
    """Routed causal attention on the kernels: `masked_attention`'s output, without its visible-pair count.

    q: [b, t, heads, d]; k, v: [b, t, kv_heads, d] (bf16 / fp16; float32 with interpret=True); codes:
    [b, h, t] int (h = heads or kv_heads); routes: [b, h, t, l, c] float32 or None. With routes, gradients
    reach them through the straight-through mask (module docstring); None: the hard mask only (evaluation).
    Returns [b, t, heads, d] in q's dtype.
    """
    codes = codes.astype(jnp.int32)
    if routes is None:
        return kernel_forward(q, k, v, codes, config=config, interpret=interpret)[0]
    return _routed(q, k, v, codes, routes, _Settings(config, execution, interpret))


def visible_pairs(codes: jax.Array, *, window: int | None, sink: bool) -> jax.Array:
    """codes: [b, h, t] int → float32 scalar: visible causal pairs of the hard mask, summed over b and h.

    O(t log t + t · window), no mask: equal-code causal pairs (the diagonal included) are Σ n(n+1)/2 over
    each code's n tokens; the window and sink add the pairs whose codes differ.
    """
    t = codes.shape[-1]
    ordered = jnp.sort(codes, axis=-1)
    index = jnp.arange(t)
    run_start = jnp.concatenate([jnp.ones_like(ordered[..., :1], bool), ordered[..., 1:] != ordered[..., :-1]], -1)
    first = jax.lax.cummax(jnp.where(run_start, index, 0), axis=codes.ndim - 1)
    total = jnp.sum(index - first + 1, dtype=jnp.float32)  # the r-th token of a run sees r earlier ones + itself
    reach = 0 if window is None else min(window, t - 1)
    if reach:
        def offset(o, count):  # pairs (i, i − o), i ≥ o, that differ in code
            differ = (codes != jnp.roll(codes, o, axis=-1)) & (index >= o)
            return count + jnp.sum(differ, dtype=jnp.float32)

        total = jax.lax.fori_loop(1, reach + 1, offset, total)
    if sink:  # key 0 for queries beyond the window, whose code differs from token 0's
        total = total + jnp.sum((codes != codes[..., :1]) & (index > reach), dtype=jnp.float32)
    return total


def prefill_kernel_attention(q, k, v, codes, *, config: RouterConfig) -> jax.Array:
    """Evaluation prefill on the code-sorted kernels (bucket pass + band pass), exact token routing; float32
    inputs run in bf16. Shapes as `masked_attention`."""
    from pallas_kernels import token_routed_attention

    low = q.dtype if q.dtype in KERNEL_DTYPES else jnp.bfloat16
    out = token_routed_attention(q.astype(low), k.astype(low), v.astype(low), codes,
                                 tile=config.block_size, window=config.window, sink=config.sink)
    return out.astype(q.dtype)
