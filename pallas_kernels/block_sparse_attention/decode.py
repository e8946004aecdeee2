"""Block-sparse decode attention: one new query token per sequence reads only its selected KV blocks.

One program per (sequence, KV head, split). It loads each selected K/V block once and serves every query
head of its GQA group with it, so K/V are never repeated and a block crosses HBM once per step. Long lists
are cut into `splits` contiguous shares (split-K, as flash-decoding does) so a small batch still fills the
GPU; each share writes a partial (o, lse) in float32 and `merge_splits` joins them exactly in plain JAX.

Visibility (the contract): for sequence b and KV head k, key slot j is visible to every query head of the
group iff j lies in one of the first `block_counts[b, k]` blocks of `block_ids[b, k]` (block i holds slots
[i · tile, (i + 1) · tile)) and j <= lengths[b]. Listed ids must be distinct and < slots / tile; entries past
the count are never read. A row that sees no key gives o = 0 and lse = -inf.

Oracles beside it: `reference_decode_attention` (dense visibility over all slots, float32, highest
precision) and `gather_decode_attention` (the gather-into-dense alternative the kernel is measured against).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from .reference import reference_attention

LOG2E = math.log2(math.e)
# Triton's dot needs at least 16 rows. A decode group has 1 to 8 query rows, so they are padded to 16: each
# K/V element loaded serves only `group` multiply-adds, far below the GPU's FLOP-per-byte balance, so the step
# is bound by reading K/V and the idle rows of the matrix unit cost no time; an elementwise [group, tile, d]
# product instead would hold group · tile · d float32 values (8 · 128 · 128 = 128 K) in registers and spill.
MIN_DOT_ROWS = 16
HEAD_DIMS = (64, 128)
# Decode programs stream K/V blocks and do little math per byte: 4 warps hold the [16, tile] scores and the
# [16, d] accumulator, 2 stages overlap the next block's load with this one's math. An offline sm_90 compile
# (pallas_kernels.resources' method, bf16, tile 128, d 128) gives 92 registers, no spills, 72 KB of shared
# memory; 3 stages 136 KB; tile 256 with 3 stages needs 268 KB, over the H100/H200's 227 KB.
DEFAULT_NUM_WARPS = 4
DEFAULT_NUM_STAGES = 2


def _decode_kernel(
    counts_ref,
    lengths_ref,
    ids_ref,
    q_ref,
    k_ref,
    v_ref,
    o_ref,
    lse_ref,
    *,
    tile: int,
    splits: int,
    scale: float,
):
    # The row's own count is shared evenly (not the list's capacity): a decode list is sized for the longest row,
    # while a row at 10 % density fills a tenth of it, which capacity-sized shares would give to a few splits.
    count = counts_ref[0]
    per = (count + splits - 1) // splits
    first = pl.program_id(2) * per
    last = jnp.minimum(count, first + per)
    length = lengths_ref[0]
    q = q_ref[...]

    def step(i, carry):
        acc, m, denom = carry
        start = pl.multiple_of(ids_ref[i] * tile, tile)
        k = k_ref[pl.ds(start, tile), :]
        v = v_ref[pl.ds(start, tile), :]
        # Scores in float32 (fp16 Q.K overflows otherwise), in the log2 domain for exp2.
        sc = pltriton.dot(q, k, trans_b=True) * (scale * LOG2E)
        # Any listed block may hold unwritten slots (the newest block, or a block past the length).
        kpos = start + lax.broadcasted_iota(jnp.int32, (1, tile), 1)
        sc = jnp.where(kpos <= length, sc, -jnp.inf)
        m_new = jnp.maximum(m, sc.max(axis=-1))
        # A row with nothing visible yet keeps m = -inf; shift by 0 there so exp2 gives 0, not NaN.
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp2(m - m_use)
        p = jnp.exp2(sc - m_use[:, None])
        denom = denom * alpha + p.sum(axis=-1)
        acc = acc * alpha[:, None] + pltriton.dot(p.astype(v.dtype), v)
        return acc, m_new, denom

    rows, d = q.shape
    carry = (
        jnp.zeros((rows, d), jnp.float32),
        jnp.full((rows,), -jnp.inf, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )
    acc, m, denom = lax.fori_loop(first, last, step, carry)  # empty when this split starts past the count
    empty = denom == 0.0
    o_ref[...] = acc / jnp.where(empty, 1.0, denom)[:, None]
    lse_ref[...] = jnp.where(empty, -jnp.inf, (m + jnp.log2(jnp.where(empty, 1.0, denom))) / LOG2E)


def merge_splits(o_parts: jax.Array, lse_parts: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Exact softmax merge of attentions over disjoint key sets (the splits), as if one softmax ran over all.

    o_parts: [..., splits, rows, head_dim] float32; lse_parts: [..., splits, rows] (natural log, -inf = empty).
    Returns o: [..., rows, head_dim] float32 (0 where every split is empty) and lse: [..., rows].
    """
    lse = jax.nn.logsumexp(lse_parts, axis=-2)
    safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    weights = jnp.exp(lse_parts - safe[..., None, :])  # exp(-inf) = 0 for empty splits
    # Elementwise, not a dot: a float32 dot on GPU may run in TF32 (10-bit mantissa) at default precision.
    return (weights[..., None] * o_parts).sum(axis=-3), lse


def _check_decode_inputs(q, k_cache, v_cache, block_ids, block_counts, lengths, tile, splits, interpret):
    if q.ndim != 3 or k_cache.ndim != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"expected q [batch, q_heads, head_dim], k_cache = v_cache [batch, slots, kv_heads, "
            f"head_dim]; got {q.shape}, {k_cache.shape}, {v_cache.shape}"
        )
    b, hq, d = q.shape
    _, slots, hkv, _ = k_cache.shape
    if k_cache.shape[0] != b or k_cache.shape[3] != d:
        raise ValueError(f"k_cache {k_cache.shape} must match q {q.shape} in batch and head_dim")
    if hq % hkv:
        raise ValueError(f"query heads {hq} must be a multiple of KV heads {hkv}")
    if tile & (tile - 1) or tile < 16:
        raise ValueError(f"tile must be a power of two >= 16, got {tile}")
    if slots % tile:
        raise ValueError(f"cache slots {slots} must be a multiple of tile {tile}")
    if d not in HEAD_DIMS:
        raise ValueError(f"head dim must be one of {HEAD_DIMS}, got {d}")
    if block_ids.ndim != 3 or block_ids.shape[:2] != (b, hkv) or block_ids.shape[2] < 1:
        raise ValueError(f"block_ids {block_ids.shape} must be [{b}, {hkv}, max_blocks >= 1]")
    if block_counts.shape != (b, hkv):
        raise ValueError(f"block_counts {block_counts.shape} must be [{b}, {hkv}]")
    if lengths.shape != (b,):
        raise ValueError(f"lengths {lengths.shape} must be [{b}]")
    if splits < 1:
        raise ValueError(f"splits must be >= 1, got {splits}")
    # float32 only where the caller asks for interpret mode explicitly (tight oracle tests on CPU), as api.py.
    dtypes = (jnp.bfloat16, jnp.float16, jnp.float32) if interpret is True else (jnp.bfloat16, jnp.float16)
    if q.dtype not in dtypes or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(
            f"q, k_cache, v_cache must share dtype bfloat16 or float16 (float32 with "
            f"interpret=True); got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}"
        )


@functools.partial(
    jax.jit, static_argnames=("tile", "splits", "sm_scale", "interpret", "num_warps", "num_stages", "return_lse")
)
def sparse_decode_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    block_ids: jax.Array,
    block_counts: jax.Array,
    lengths: jax.Array,
    *,
    tile: int,
    splits: int = 1,
    sm_scale: float | None = None,
    interpret: bool | None = None,
    num_warps: int | None = None,
    num_stages: int = DEFAULT_NUM_STAGES,
    return_lse: bool = False,
):
    """Attention of one new token per sequence over the listed KV blocks of its cache (module docstring rule).

    q: [batch, q_heads, head_dim] (bf16 / fp16; float32 with interpret=True); k_cache, v_cache:
    [batch, slots, kv_heads, head_dim], slots a multiple of tile; block_ids: [batch, kv_heads, max_blocks]
    int, any order; block_counts: [batch, kv_heads] int in [0, max_blocks]; lengths: [batch] int, the new
    token's slot (already written). Query head h reads KV head h // (q_heads / kv_heads).
    splits: programs per (sequence, KV head); split s walks list entries [s · per, (s + 1) · per) of its row,
    per = ceil(block_counts[b, k] / splits). num_warps / num_stages: Triton launch parameters.
    Returns o: [batch, q_heads, head_dim] in q's dtype, and with return_lse lse: [batch, q_heads] float32
    (natural log; o = 0 and lse = -inf on rows that see no key).
    """
    _check_decode_inputs(q, k_cache, v_cache, block_ids, block_counts, lengths, tile, splits, interpret)
    interpret = jax.default_backend() == "cpu" if interpret is None else interpret
    b, hq, d = q.shape
    slots, hkv = k_cache.shape[1:3]
    group = hq // hkv
    rows = max(MIN_DOT_ROWS, 1 << (group - 1).bit_length())  # a power of two for Triton
    max_blocks = block_ids.shape[2]
    scale = d**-0.5 if sm_scale is None else sm_scale

    q_rows = jnp.pad(q.reshape(b, hkv, group, d), ((0, 0), (0, 0), (0, rows - group), (0, 0)))
    args = [
        block_counts.astype(jnp.int32)[..., None],
        lengths.astype(jnp.int32)[:, None],
        block_ids.astype(jnp.int32),
        q_rows,
        k_cache,
        v_cache,
    ]
    in_specs = [
        pl.BlockSpec((None, None, 1), lambda bi, k, s: (bi, k, 0)),
        pl.BlockSpec((None, 1), lambda bi, k, s: (bi, 0)),
        pl.BlockSpec((None, None, max_blocks), lambda bi, k, s: (bi, k, 0)),
        pl.BlockSpec((None, None, rows, d), lambda bi, k, s: (bi, k, 0, 0)),
        pl.BlockSpec((None, slots, None, d), lambda bi, k, s: (bi, 0, k, 0)),
        pl.BlockSpec((None, slots, None, d), lambda bi, k, s: (bi, 0, k, 0)),
    ]
    out_shape = [
        jax.ShapeDtypeStruct((b, hkv, splits, rows, d), jnp.float32),
        jax.ShapeDtypeStruct((b, hkv, splits, rows), jnp.float32),
    ]
    out_specs = [
        pl.BlockSpec((None, None, None, rows, d), lambda bi, k, s: (bi, k, s, 0, 0)),
        pl.BlockSpec((None, None, None, rows), lambda bi, k, s: (bi, k, s, 0)),
    ]
    kernel = functools.partial(_decode_kernel, tile=tile, splits=splits, scale=scale)
    o_parts, lse_parts = pl.pallas_call(
        kernel,
        grid=(b, hkv, splits),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=pltriton.CompilerParams(
            num_warps=DEFAULT_NUM_WARPS if num_warps is None else num_warps, num_stages=num_stages
        ),
        interpret=interpret,
        name="block_sparse_decode_attention",
    )(*args)
    if splits == 1:  # nothing to merge (o = 0 and lse = -inf on empty rows already): no merge kernels
        o, lse = o_parts[:, :, 0, :group, :], lse_parts[:, :, 0, :group]
    else:
        o, lse = merge_splits(o_parts[..., :group, :], lse_parts[..., :group])
    o = o.reshape(b, hq, d).astype(q.dtype)
    lse = lse.reshape(b, hq)
    return (o, lse) if return_lse else o


def _listed(block_ids, block_counts):
    """[batch, kv_heads, max_blocks] bool: which list entries count (the first block_counts of each row)."""
    return jnp.arange(block_ids.shape[-1], dtype=jnp.int32) < block_counts[..., None]


@functools.partial(jax.jit, static_argnames=("tile", "sm_scale", "return_lse"))
def reference_decode_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    block_ids: jax.Array,
    block_counts: jax.Array,
    lengths: jax.Array,
    *,
    tile: int,
    sm_scale: float | None = None,
    return_lse: bool = True,
):
    """The oracle: the module docstring's rule as a dense [batch, kv_heads, slots] mask, float32 attention.

    Same arguments as `sparse_decode_attention`. Returns o: [batch, q_heads, head_dim] float32 and
    lse: [batch, q_heads] (o = 0, lse = -inf on rows that see no key).
    """
    b, slots, hkv, _ = k_cache.shape
    listed = _listed(block_ids, block_counts)
    # Unlisted entries scatter out of range and are dropped, whatever garbage they hold.
    ids = jnp.where(listed, block_ids, slots // tile)
    rows = jnp.arange(b)[:, None, None]
    heads = jnp.arange(hkv)[None, :, None]
    on = jnp.zeros((b, hkv, slots // tile), bool).at[rows, heads, ids].set(True, mode="drop")
    slot = jnp.arange(slots, dtype=jnp.int32)
    mask = jnp.repeat(on, tile, axis=-1) & (slot <= lengths[:, None, None])
    o, lse = reference_attention(q[:, None], k_cache, v_cache, mask[:, :, None, :], sm_scale=sm_scale, return_lse=True)
    o, lse = o[:, 0], lse[..., 0]
    return (o, lse) if return_lse else o


@functools.partial(jax.jit, static_argnames=("tile", "sm_scale", "return_lse"))
def gather_decode_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    block_ids: jax.Array,
    block_counts: jax.Array,
    lengths: jax.Array,
    *,
    tile: int,
    sm_scale: float | None = None,
    return_lse: bool = False,
):
    """Gather-into-dense decode: take the listed blocks' K/V, then masked attention in plain JAX.

    Same arguments and result as `sparse_decode_attention`, but o is float32; the baseline it is measured
    against. Gathers [batch, max_blocks, tile, kv_heads, head_dim] in the cache's dtype from the cache viewed
    as blocks (a free reshape), so nothing slots-sized is copied per head. Rounds P to the cache's dtype before
    P·V, as a dense attention kernel does (nothing for float32, which runs at highest precision).
    """
    b, hq, d = q.shape
    _, slots, hkv, _ = k_cache.shape
    group = hq // hkv
    max_blocks = block_ids.shape[-1]
    scale = d**-0.5 if sm_scale is None else sm_scale
    listed = _listed(block_ids, block_counts)
    # Unlisted entries may hold garbage: read block 0 there (masked out below) instead of out of range.
    ids = jnp.where(listed, block_ids, 0).astype(jnp.int32)
    ids_by_block = jnp.swapaxes(ids, 1, 2)[:, :, None, :, None]  # [b, max_blocks, 1, hkv, 1]

    def gather(cache):
        blocks = cache.reshape(b, slots // tile, tile, hkv, d)
        return jnp.take_along_axis(blocks, ids_by_block, axis=1, mode="clip")

    k, v = gather(k_cache), gather(v_cache)  # [b, max_blocks, tile, hkv, d]
    slot = ids[..., None] * tile + jnp.arange(tile, dtype=jnp.int32)  # [b, hkv, max_blocks, tile]
    visible = (listed[..., None] & (slot <= lengths[:, None, None, None])).reshape(b, hkv, 1, max_blocks, tile)
    qg = q.reshape(b, hkv, group, d)
    with jax.default_matmul_precision("highest"):
        s = jnp.einsum("bkgd,bmtkd->bkgmt", qg, k, preferred_element_type=jnp.float32) * scale
        s = jnp.where(visible, s, -jnp.inf)
        lse = jax.nn.logsumexp(s, axis=(-2, -1))  # -inf on rows that see no key
        p = jnp.exp(s - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None, None])  # exp(-inf) = 0 where hidden
        o = jnp.einsum("bkgmt,bmtkd->bkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    o, lse = o.reshape(b, hq, d), lse.reshape(b, hq)
    return (o, lse) if return_lse else o


def decode_splits(batch: int, kv_heads: int, blocks: int) -> int:
    """Split-K programs per (sequence, KV head) for lists of up to `blocks` blocks: about 256 programs whatever the
    batch (an H200 has 132 multiprocessors; batch 1 with 8 KV heads would otherwise run 8 programs that each walk a
    long list one block after another), at most 32, and at most one split per 32 blocks. One split when the whole
    step reads at most 256 blocks: there the merge's kernels cost more than the split saves (SmolLM2 at 8k)."""
    if batch * kv_heads * blocks <= 256:
        return 1
    return max(1, min(32, 256 // (batch * kv_heads), -(-blocks // 32)))


def dense_decode_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    lengths: jax.Array,
    *,
    tile: int = 128,
    splits: int | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Dense decode (flash-decoding): every block up to the new token's, through the same kernel.

    The dense baseline a sparse decode must beat: GQA-native and split-K like the sparse one, and it reads each
    sequence's written slots only (the masked XLA attention reads and scores every slot of the cache).
    q: [batch, q_heads, head_dim]; k_cache, v_cache: [batch, slots, kv_heads, head_dim]; lengths: [batch], the
    new token's slot → o: [batch, q_heads, head_dim] in q's dtype.
    """
    b, slots, hkv, _ = k_cache.shape
    blocks = slots // tile
    ids = jnp.broadcast_to(jnp.arange(blocks, dtype=jnp.int32), (b, hkv, blocks))
    counts = jnp.broadcast_to((lengths.astype(jnp.int32) // tile + 1)[:, None], (b, hkv))
    splits = decode_splits(b, hkv, blocks) if splits is None else splits
    return sparse_decode_attention(q, k_cache, v_cache, ids, counts, lengths, tile=tile, splits=splits,
                                   interpret=interpret)
