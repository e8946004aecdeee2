"""In-tile first rows (row routing with a prefix union, METHOD.md §12): kernels vs the float32 reference.

A tile (query block b, key block j) with first row s is seen only by the rows of block b whose offset
i % tile is ≥ s. CPU runs the kernels in interpret mode, whose outputs start NaN-filled (and `poison=True`
aliases NaN-filled buffers on GPU), so an unwritten row fails the finiteness check. Fresh inputs each run:
the seed is in every message.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import BF16_U, F32_U, float32_bound, fresh_seed
from jax.test_util import check_grads
from test_kernels import LSE_TOLERANCE, TOLERANCE, hopper_supported, qkv, rel_err

from pallas_kernels.block_sparse_attention import (
    SoftMask,
    block_sparse_attention,
    build_schedule,
    reference_attention,
    sparse_attention_backward,
    sparse_attention_forward,
    transpose_schedule,
    validate_schedule,
)
from pallas_kernels.block_sparse_attention.masks import tiled_token_mask


def forward_tolerance(dtype, n, tile):
    """Relative Frobenius bound of the kernel's o against the float32 reference.

    bf16: rounding P before P·V and O once, ≤ 2u (test_kernels.TOLERANCE). float32: summation order only
    (interpret mode multiplies exactly in float32): the score sum over d, the exp-sum and P·V over ≤ n keys,
    and one online-softmax rescale per key tile, float32_bound(n, depth 2 + n / tile).
    """
    if dtype == jnp.float32:
        return float32_bound(n, depth=2 + -(-n // tile))
    return TOLERANCE[dtype]


def backward_tolerance(dtype, n, group):
    """bf16: P, dS and the gradient rounded, ≤ 3u (test_kernels' bound, 1e-2 ≥ 2.6u). float32: summation order
    along the chain (scores, P·V, the row term Σ dO·O, dP, dS·K / dSᵀ·Q summed over the group's n·group rows),
    float32_bound(n · group, depth 5)."""
    if dtype == jnp.float32:
        return float32_bound(n * group, depth=5)
    return TOLERANCE[dtype]


assert TOLERANCE[jnp.bfloat16] >= 2 * BF16_U


def random_first_rows(key, tiles, tile):
    """Random first rows in [0, tile) with every special value present: 0 (the whole tile), tile − 1 (the last
    row alone) and, in the first query block, tile − 1 on the diagonal (rows 0 … tile − 2 of block 0 see no key
    at all when nothing else is on)."""
    fr = jax.random.randint(key, tiles.shape, 0, tile, jnp.int32)
    fr = jnp.where(jax.random.bernoulli(jax.random.fold_in(key, 1), 0.3, tiles.shape), 0, fr)
    fr = jnp.where(jax.random.bernoulli(jax.random.fold_in(key, 2), 0.2, tiles.shape), tile - 1, fr)
    return fr.at[..., 0, 0].set(tile - 1)


def random_tiles(key, b, r, nt, density):
    return jax.random.bernoulli(key, density, (b, r, nt, nt)) | jnp.eye(nt, dtype=bool)


# ---------------------------------------------------------------- schedule


def test_schedules_carry_first_rows_plain_tiles_first():
    seed = fresh_seed()
    key = jax.random.key(seed)
    tile = 16
    tm = jax.random.bernoulli(key, 0.5, (2, 3, 9, 9))
    fr = random_first_rows(jax.random.fold_in(key, 1), tm, tile)
    validate_schedule(build_schedule(tm, fr), tm, fr)
    validate_schedule(transpose_schedule(tm, fr), jnp.swapaxes(tm, -1, -2), jnp.swapaxes(fr, -1, -2), transposed=True)
    # First rows all zero: the same tiles, only the diagonal in the masked part (today's kernels mask the last).
    sched = build_schedule(tm, jnp.zeros(tm.shape, jnp.int32))
    plain = np.asarray(build_schedule(tm).counts) - np.asarray(jnp.diagonal(tm, axis1=-2, axis2=-1))
    np.testing.assert_array_equal(np.asarray(sched.plain), plain, err_msg=f"seed {seed}")


# ---------------------------------------------------------------- forward

FORWARD_CASES = [
    # b, n, hq, hkv, dtype, routing, tile, density, codes, window
    (2, 100, 4, 1, jnp.bfloat16, "kv", 16, 0.5, False, 0),  # ragged, GQA 4:1, per KV head
    (1, 96, 8, 2, jnp.float32, "q", 32, 0.6, False, 0),  # aligned, GQA 4:1, per query head, float32
    (1, 80, 4, 1, jnp.float32, "kv", 16, 0.4, False, 0),  # ragged, float32
    (1, 72, 4, 1, jnp.bfloat16, "q", 16, 0.5, True, 9),  # codes + window + sink inside the first rows
]


@pytest.mark.parametrize("case", FORWARD_CASES, ids=[f"case{i}" for i in range(len(FORWARD_CASES))])
def test_forward_with_first_rows_matches_reference(case):
    b, n, hq, hkv, dtype, routing, tile, density, use_codes, window = case
    seed = fresh_seed()
    key = jax.random.key(seed)
    q, k, v = qkv(seed % 10_000, b, n, hq, hkv, 64, dtype)
    r = hkv if routing == "kv" else hq
    nt = -(-n // tile)
    tm = random_tiles(jax.random.fold_in(key, 1), b, r, nt, density)
    fr = random_first_rows(jax.random.fold_in(key, 2), tm, tile)
    # The last, ragged query block holds n % tile real rows: a first row at or past it masks all of them.
    if n % tile:
        fr = fr.at[..., nt - 1, 0].set(n % tile).at[..., nt - 1, nt - 1].set(0)
    codes = jax.random.randint(jax.random.fold_in(key, 3), (b, r, n), 0, 3) if use_codes else None
    kw = dict(tile=tile, codes=codes, window=window, return_lse=True, poison=True)
    if dtype == jnp.float32:
        kw["interpret"] = True  # float32 only where the caller asks for interpret mode
    o, lse = block_sparse_attention(q, k, v, tm, first_rows=fr, **kw)
    mask = tiled_token_mask(tm, n, tile, codes=codes, window=window, first_rows=fr)
    ref, ref_lse = reference_attention(q, k, v, mask, return_lse=True)
    assert o.shape == q.shape and o.dtype == q.dtype
    # Precondition: the first rows do hide pairs that the tiles alone would show.
    assert not np.array_equal(np.asarray(mask), np.asarray(tiled_token_mask(tm, n, tile, codes=codes, window=window)))
    assert rel_err(o, ref) <= forward_tolerance(dtype, n, tile), f"seed {seed}"
    empty = np.isneginf(np.asarray(ref_lse))
    np.testing.assert_array_equal(np.isneginf(np.asarray(lse)), empty, err_msg=f"seed {seed}")
    finite = ~empty
    np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(ref_lse)[finite], rtol=LSE_TOLERANCE,
                               atol=LSE_TOLERANCE, err_msg=f"seed {seed}")


def test_rows_masked_everywhere_give_zero_and_minus_inf():
    """Only the diagonal tile is on, with first row tile − 1: rows 0 … tile − 2 of each block see no key."""
    b, n, hq, hkv, tile = 1, 64, 4, 1, 16
    nt = n // tile
    q, k, v = qkv(fresh_seed() % 10_000, b, n, hq, hkv, 64, jnp.bfloat16)
    tm = jnp.eye(nt, dtype=bool)[None, None]
    fr = jnp.full(tm.shape, tile - 1, jnp.int32)
    o, lse = block_sparse_attention(q, k, v, tm, tile=tile, first_rows=fr, return_lse=True, poison=True)
    o, lse = np.asarray(o, np.float32).reshape(b, nt, tile, hq, -1), np.asarray(lse).reshape(b, hq, nt, tile)
    assert np.all(o[:, :, : tile - 1] == 0) and np.all(np.isneginf(lse[..., : tile - 1]))
    ref = reference_attention(q, k, v, tiled_token_mask(tm, n, tile, first_rows=fr))
    assert rel_err(o.reshape(q.shape), ref) <= TOLERANCE[jnp.bfloat16]


def test_zero_first_rows_equal_no_first_rows():
    """first_rows = 0 runs the first-rows kernels on today's visibility: the same numbers as first_rows=None."""
    seed = fresh_seed()
    b, n, hq, hkv, tile = 1, 80, 4, 1, 16
    q, k, v = qkv(seed % 10_000, b, n, hq, hkv, 64, jnp.float32)
    tm = random_tiles(jax.random.key(seed), b, hkv, n // tile, 0.5)
    zero = jnp.zeros(tm.shape, jnp.int32)
    kw = dict(tile=tile, interpret=True, return_lse=True)
    o0, lse0 = block_sparse_attention(q, k, v, tm, **kw)
    o1, lse1 = block_sparse_attention(q, k, v, tm, first_rows=zero, **kw)
    # The same tiles in the same order with the same float32 arithmetic (a mask of all-visible tiles only adds
    # selects that pick the scores): equal to the bit.
    np.testing.assert_array_equal(np.asarray(o1), np.asarray(o0), err_msg=f"seed {seed}")
    np.testing.assert_array_equal(np.asarray(lse1), np.asarray(lse0), err_msg=f"seed {seed}")


def test_first_rows_checks():
    q, k, v = qkv(0, 1, 64, 4, 1, 64, jnp.bfloat16)
    tm = jnp.ones((1, 1, 4, 4), bool)
    with pytest.raises(ValueError, match="first_rows"):
        block_sparse_attention(q, k, v, tm, tile=16, first_rows=jnp.zeros((1, 1, 4, 3), jnp.int32))
    with pytest.raises(ValueError, match="first_rows"):
        block_sparse_attention(q, k, v, tm, tile=16, first_rows=jnp.zeros((1, 1, 4, 4), jnp.float32))
    routes = jnp.zeros((1, 1, 64, 2, 2), jnp.float32)
    with pytest.raises(NotImplementedError, match="first_rows"):
        block_sparse_attention(q, k, v, tm, tile=16, first_rows=jnp.zeros((1, 1, 4, 4), jnp.int32), routes=routes,
                               soft_mask=SoftMask(1.0, 1.0, 2, 2))


# ---------------------------------------------------------------- backward


@pytest.mark.parametrize(
    "routing,n,dtype,use_codes",
    [("kv", 100, jnp.bfloat16, False), ("q", 64, jnp.float32, False), ("kv", 48, jnp.float32, True)],
)
def test_backward_with_first_rows_matches_grad_of_reference(routing, n, dtype, use_codes):
    seed = fresh_seed()
    key = jax.random.key(seed)
    b, hq, hkv, tile, window = 1, 4, 1, 16, 7
    group = hq // hkv
    q, k, v = qkv(seed % 10_000, b, n, hq, hkv, 64, dtype)
    r = hkv if routing == "kv" else hq
    nt = -(-n // tile)
    tm = random_tiles(jax.random.fold_in(key, 1), b, r, nt, 0.5)
    fr = random_first_rows(jax.random.fold_in(key, 2), tm, tile)
    codes = jax.random.randint(jax.random.fold_in(key, 3), (b, r, n), 0, 3) if use_codes else None
    mask = tiled_token_mask(tm, n, tile, codes=codes, window=window, first_rows=fr)
    interpret = True if dtype == jnp.float32 else None

    def kernel(q, k, v):
        return block_sparse_attention(q, k, v, tm, tile=tile, codes=codes, window=window, first_rows=fr,
                                      interpret=interpret)

    ct = jax.random.normal(jax.random.fold_in(key, 4), q.shape, jnp.float32)

    def grads(fn, *args):
        return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * ct), argnums=(0, 1, 2))(*args)

    got = grads(kernel, q, k, v)
    want = grads(lambda q, k, v: reference_attention(q, k, v, mask), *(x.astype(jnp.float32) for x in (q, k, v)))
    for name, g, w in zip("qkv", got, want, strict=True):
        assert g.dtype == dtype
        assert rel_err(g, w) <= backward_tolerance(dtype, n, group), f"d{name}, seed {seed}"


def test_dkv_in_slices_with_first_rows_equals_the_whole_tile():
    """dk/dv programs of 16 keys walking 16 query rows at a time place the first rows by the slice's offset in
    its tile: the same sums as whole 32-tiles (float32)."""
    seed = fresh_seed()
    key = jax.random.key(seed)
    b, n, hq, hkv, tile = 1, 96, 4, 1, 32
    q, k, v = qkv(seed % 10_000, b, n, hq, hkv, 64, jnp.float32)
    tm = random_tiles(jax.random.fold_in(key, 1), b, hkv, n // tile, 0.6)
    fr = random_first_rows(jax.random.fold_in(key, 2), tm, tile)
    schedules = build_schedule(tm, fr), transpose_schedule(tm, fr)
    o, lse = sparse_attention_forward(q, k, v, schedules[0], tile=tile, interpret=True)
    do = jax.random.normal(jax.random.fold_in(key, 3), q.shape, jnp.float32)
    whole = sparse_attention_backward(q, k, v, o, lse, do, None, *schedules, tile=tile, interpret=True)
    sliced = sparse_attention_backward(q, k, v, o, lse, do, None, *schedules, tile=tile, interpret=True,
                                       dkv_key_rows=16, dkv_query_rows=16)
    # As test_kernels' slice test: the same float32 sums grouped 16 rows at a time, float32_bound(n).
    for name, a, e in zip("qkv", sliced, whole, strict=True):
        assert rel_err(a, e) <= float32_bound(n), f"d{name}, seed {seed}"


def test_reference_with_first_rows_matches_finite_differences():
    """The backward tests' oracle is right with first rows too (float32, tiny, central differences)."""
    seed = fresh_seed()
    key = jax.random.key(seed)
    q, k, v = (x.astype(jnp.float32) for x in qkv(seed % 10_000, 1, 8, 2, 1, 4, jnp.float32))
    tm = random_tiles(key, 1, 1, 4, 0.6)
    mask = tiled_token_mask(tm, 8, 2, first_rows=random_first_rows(jax.random.fold_in(key, 1), tm, 2))
    # As test_kernels.test_reference_gradients_match_finite_differences: eps 1e-3 in float32, rounding
    # u·|f|/eps per element, √64 of them through the random cotangent, ×10 margin.
    eps = 1e-3
    tolerance = 10 * np.sqrt(q.size) * F32_U / eps
    check_grads(lambda q, k, v: reference_attention(q, k, v, mask), (q, k, v), order=1, modes=["rev"], eps=eps,
                atol=tolerance, rtol=tolerance)


# ---------------------------------------------------------------- GPU only (skipped on CPU / CI)

on_hopper = pytest.mark.skipif(
    not hopper_supported(jnp.zeros((1, 1, 1, 128), jnp.bfloat16), 128), reason="needs a Hopper GPU"
)


@on_hopper
@pytest.mark.parametrize("backend,routing", list(itertools.product(["hopper", "triton"], ["kv", "q"])))
def test_gpu_kernels_with_first_rows(backend, routing):
    seed = fresh_seed()
    key = jax.random.key(seed)
    b, n, hq, hkv, tile, dtype = 2, 1000, 8, 2, 128, jnp.bfloat16
    q, k, v = qkv(seed % 10_000, b, n, hq, hkv, 128, dtype)
    r = hkv if routing == "kv" else hq
    nt = -(-n // tile)
    tm = random_tiles(jax.random.fold_in(key, 1), b, r, nt, 0.4)
    fr = random_first_rows(jax.random.fold_in(key, 2), tm, tile)
    mask = tiled_token_mask(tm, n, tile, first_rows=fr)
    o, lse = block_sparse_attention(q, k, v, tm, first_rows=fr, return_lse=True, backend=backend)
    ref, ref_lse = reference_attention(q, k, v, mask, return_lse=True)
    assert rel_err(o, ref) <= TOLERANCE[dtype], f"seed {seed}"
    empty = np.isneginf(np.asarray(ref_lse))
    np.testing.assert_array_equal(np.isneginf(np.asarray(lse)), empty, err_msg=f"seed {seed}")
    np.testing.assert_allclose(np.asarray(lse)[~empty], np.asarray(ref_lse)[~empty], rtol=LSE_TOLERANCE,
                               atol=LSE_TOLERANCE, err_msg=f"seed {seed}")
