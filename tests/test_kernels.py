"""Block-sparse attention kernels vs the float32 dense reference (CPU: Pallas interpret mode).

Interpret mode fills Pallas outputs with NaN before the kernel runs, and `poison=True` aliases
NaN-filled buffers on GPU too, so an unwritten row fails the finiteness check.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import BF16_U, F16_U, F32_U, float32_bound
from jax.test_util import check_grads

from llama_surgery_jax.surgery.mask import band_tiles, block_density, sorted_bucket_tiles, tile_mask, tiled_token_mask
from pallas_kernels.block_sparse_attention import (
    Rule,
    block_sparse_attention,
    build_schedule,
    chunked_reference_attention,
    hopper_supported,
    merge_partials,
    reference_attention,
    sparse_attention_forward,
    token_routed_attention,
    transpose_schedule,
    validate_schedule,
)
from pallas_kernels.block_sparse_attention.bench import random_qkv

# Relative Frobenius error bounds (the issue's): the kernel accumulates in float32, so the error is the rounding
# of arrays to the input type (u = 2^-8 for bf16, 2^-11 for fp16; the float32 reference runs at highest matmul
# precision on the same rounded inputs). Each rounding moves every element by ≤ u. Forward: P before P·V and
# O once, ≤ 2u (bf16 7.8e-3, fp16 9.8e-4; measured 1.6e-3 to 1.9e-3 and 2.3e-4). Backward: P, dS and the
# gradient, ≤ 3u (bf16 1.2e-2, fp16 1.5e-3), where the typical error is ≈ u/√3 per rounding (≈ u for three,
# measured bf16 2.9e-3): the bounds sit at 2.6u (bf16) and 4.1u (fp16).
TOLERANCE = {jnp.bfloat16: 1e-2, jnp.float16: 2e-3}
assert all(TOLERANCE[t] >= 2 * u for t, u in ((jnp.bfloat16, BF16_U), (jnp.float16, F16_U)))
# lse = max + log Σ exp(s − max) in float32 on both sides from the same rounded q, k (their products are exact
# in float32): the score sums over d ≤ 128 and the exp-sum over ≤ 200 keys reorder, and the kernel's online
# softmax rescales once per key tile (≤ 7): float32_bound(200, depth 2 + 7) = 2.5e-5 of |lse| + 1 (measured
# 2.3e-7); GPU's ex2.approx (2 ulp) fits in the margin.
LSE_TOLERANCE = float32_bound(200, depth=9)


def assert_lse_close(lse, ref_lse):
    np.testing.assert_allclose(np.asarray(lse), np.asarray(ref_lse), rtol=LSE_TOLERANCE, atol=LSE_TOLERANCE)


def qkv(seed, b, n, hq, hkv, d, dtype):
    """Fresh q [b, n, hq, d], k and v [b, n, hkv, d]: the bench's inputs, from a seed."""
    return random_qkv(jax.random.PRNGKey(seed), b, n, hq, hkv, d, dtype)


def rel_err(out, ref):
    out = np.asarray(out, np.float32)
    assert np.isfinite(out).all(), "unwritten (NaN) or non-finite output"
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def random_tiles(seed, b, r, nt, density):
    on = jax.random.bernoulli(jax.random.PRNGKey(seed), density, (b, r, nt, nt))
    return on | jnp.eye(nt, dtype=bool)


# ---------------------------------------------------------------- schedule


def test_schedule_lists_exactly_the_causal_active_tiles():
    mask = jax.random.bernoulli(jax.random.PRNGKey(0), 0.3, (2, 3, 9, 9))
    validate_schedule(build_schedule(mask), mask)
    validate_schedule(build_schedule(jnp.zeros((1, 1, 4, 4), bool)), np.zeros((1, 1, 4, 4), bool))


@pytest.mark.parametrize(
    "tile,window,sink", [(16, 0, True), (16, 40, True), (8, 17, False), (16, None, True), (16, None, False)]
)
def test_band_tiles_is_or_of_token_rule(tile, window, sink):
    n = 7 * tile
    nt = n // tile
    rule = tiled_token_mask(
        jnp.ones((1, 1, nt, nt), bool), n, tile, codes=jnp.arange(n)[None, None] + 1, window=window, sink=sink
    )[0, 0]  # unique codes: only sink/window/diagonal
    want = np.asarray(rule).reshape(nt, tile, nt, tile).any(axis=(1, 3))
    np.testing.assert_array_equal(np.asarray(band_tiles(nt, tile=tile, window=window, sink=sink)), want)


def test_tile_mask_is_or_of_token_mask():
    n, tile, num_codes = 128, 16, 6
    codes = jax.random.randint(jax.random.PRNGKey(3), (2, 2, n), 0, num_codes)
    nt = n // tile
    tm = tile_mask(codes, tile=tile, window=20, sink=True)
    tok = tiled_token_mask(jnp.ones((2, 2, nt, nt), bool), n, tile, codes=codes, window=20)
    want = np.asarray(tok).reshape(2, 2, nt, tile, nt, tile).any(axis=(3, 5))
    np.testing.assert_array_equal(np.asarray(tm), want)


def test_bucket_tiles_is_or_of_same_code_pairs():
    n, tile = 96, 16
    codes = jnp.sort(jax.random.randint(jax.random.PRNGKey(4), (1, 2, n), 0, 5), axis=-1)
    same = (codes[..., :, None] == codes[..., None, :]) & jnp.tril(jnp.ones((n, n), bool))
    want = np.asarray(same).reshape(1, 2, n // tile, tile, n // tile, tile).any(axis=(3, 5))
    np.testing.assert_array_equal(np.asarray(sorted_bucket_tiles(codes, tile=tile)), want)


def test_block_density():
    nt = 8
    assert float(block_density(jnp.ones((1, 1, nt, nt), bool))) == 1.0
    # 8 tiles over 36 in float32 (one rounding, ≤ u = 6e-8 relative): inside approx's default 1e-6.
    assert float(block_density(jnp.eye(nt, dtype=bool)[None, None])) == pytest.approx(nt / 36, rel=10 * F32_U)


# ---------------------------------------------------------------- forward kernel

CASES = [
    # b, n, hq, hkv, d, dtype, routing, tile, density, codes, window, sink
    (2, 128, 4, 1, 64, jnp.bfloat16, "kv", 32, 0.4, False, 0, True),  # aligned, GQA 4:1
    (1, 200, 8, 1, 64, jnp.float16, "q", 32, 0.5, False, 0, True),  # ragged, GQA 8:1, per q head
    (1, 96, 4, 1, 128, jnp.bfloat16, "kv", 32, 1.0, False, 0, True),  # fully dense, d 128
    (2, 160, 4, 2, 64, jnp.float16, "kv", 32, 0.6, True, 24, True),  # codes + window + sink
    (1, 150, 2, 2, 64, jnp.bfloat16, "q", 16, 0.5, True, None, False),  # codes, no window/sink
]


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_forward_matches_reference(case):
    b, n, hq, hkv, d, dtype, routing, tile, density, use_codes, window, sink = case
    q, k, v = qkv(hash(case) % 1000, b, n, hq, hkv, d, dtype)
    r = hkv if routing == "kv" else hq
    nt = -(-n // tile)
    tm = random_tiles(n, b, r, nt, density)
    codes = jax.random.randint(jax.random.PRNGKey(7), (b, r, n), 0, 3) if use_codes else None
    o, lse = block_sparse_attention(
        q, k, v, tm, tile=tile, codes=codes, window=window, sink=sink, return_lse=True, poison=True
    )
    mask = tiled_token_mask(tm, n, tile, codes=codes, window=window, sink=sink)
    ref, ref_lse = reference_attention(q, k, v, mask, return_lse=True)
    assert o.shape == q.shape and o.dtype == q.dtype
    assert rel_err(o, ref) <= TOLERANCE[dtype]
    assert_lse_close(lse, ref_lse)


def test_rows_seeing_only_sink_and_window():
    """Codes that never match: every row sees exactly key 0, its window and itself."""
    b, n, hq, hkv, d, tile, window = 1, 128, 4, 1, 64, 32, 20
    q, k, v = qkv(11, b, n, hq, hkv, d, jnp.bfloat16)
    nt = n // tile
    tm = band_tiles(nt, tile=tile, window=window, sink=True)[None, None]
    codes = jnp.arange(n, dtype=jnp.int32)[None, None]  # all distinct
    o = block_sparse_attention(q, k, v, tm, tile=tile, codes=codes, window=window, poison=True)
    ref = reference_attention(q, k, v, tiled_token_mask(tm, n, tile, codes=codes, window=window))
    assert rel_err(o, ref) <= TOLERANCE[jnp.bfloat16]


def test_rows_with_no_visible_key_give_zero_and_minus_inf():
    """Diagonal tile off: the first query tile sees nothing; the rule defines o = 0, lse = -inf."""
    b, n, hq, hkv, d, tile = 1, 64, 2, 1, 64, 32
    q, k, v = qkv(12, b, n, hq, hkv, d, jnp.float16)
    tm = jnp.array([[False, False], [True, False]])[None, None]
    o, lse = block_sparse_attention(q, k, v, tm, tile=tile, return_lse=True, poison=True)
    assert np.all(np.asarray(o[:, :tile]) == 0) and np.all(np.isneginf(np.asarray(lse[..., :tile])))
    ref = reference_attention(q, k, v, tiled_token_mask(tm, n, tile))
    assert rel_err(o, ref) <= TOLERANCE[jnp.float16]


def test_partial_attentions_merge_exactly():
    """Two disjoint tile masks, merged by lse, equal their union in one pass."""
    b, n, hq, hkv, d, tile = 1, 128, 2, 1, 64, 32
    q, k, v = qkv(13, b, n, hq, hkv, d, jnp.float16)
    nt = n // tile
    a = random_tiles(1, b, hkv, nt, 0.5)
    bmask = ~a & jnp.tril(jnp.ones((nt, nt), bool))
    oa, la = block_sparse_attention(q, k, v, a, tile=tile, return_lse=True)
    ob, lb = block_sparse_attention(q, k, v, bmask, tile=tile, return_lse=True)
    o, lse = merge_partials(oa, la, ob, lb, out_dtype=jnp.float32)
    ref, ref_lse = reference_attention(q, k, v, tiled_token_mask(a | bmask, n, tile), return_lse=True)
    assert rel_err(o, ref) <= TOLERANCE[jnp.float16]
    assert_lse_close(lse, ref_lse)


def test_local_and_bucket_rules_split_the_codes_rule():
    """BUCKET (codes, minus local) and LOCAL partition the CODES rule's keys, per token."""
    b, n, hq, hkv, d, tile, window = 1, 64, 2, 1, 64, 16, 10
    q, k, v = qkv(14, b, n, hq, hkv, d, jnp.float16)
    codes = jax.random.randint(jax.random.PRNGKey(2), (b, hkv, n), 0, 3)
    nt = n // tile
    sched = build_schedule(jnp.ones((b, hkv, nt, nt), bool))
    kw = dict(tile=tile, codes=codes, window=window, interpret=True, out_dtype=jnp.float32)
    ob, lb = sparse_attention_forward(q, k, v, sched, rule=Rule.BUCKET, **kw)
    ol, ll = sparse_attention_forward(q, k, v, sched, rule=Rule.LOCAL, **kw)
    o, _ = merge_partials(ob, lb, ol, ll)
    ref = reference_attention(
        q, k, v, tiled_token_mask(jnp.ones((b, hkv, nt, nt), bool), n, tile, codes=codes, window=window)
    )
    assert rel_err(o, ref) <= TOLERANCE[jnp.float16]


# ---------------------------------------------------------------- token-level routing (sorted)


@pytest.mark.parametrize(
    "routing,n,window,sink,dtype",
    [
        ("kv", 128, 16, True, jnp.bfloat16),  # per KV head, GQA 4:1, aligned
        ("q", 100, 0, True, jnp.float16),  # per query head, ragged
        ("kv", 96, None, False, jnp.float16),  # no window, no sink: codes + diagonal only
    ],
)
def test_token_routed_attention_is_exact(routing, n, window, sink, dtype):
    b, hq, hkv, d, tile = 2, 4, 1, 64, 16
    q, k, v = qkv(n, b, n, hq, hkv, d, dtype)
    r = hkv if routing == "kv" else hq
    codes = jax.random.randint(jax.random.PRNGKey(n), (b, r, n), 0, 4)
    o, lse = token_routed_attention(q, k, v, codes, tile=tile, window=window, sink=sink, return_lse=True)
    nt = -(-n // tile)
    ref, ref_lse = reference_attention(
        q,
        k,
        v,
        tiled_token_mask(jnp.ones((b, r, nt, nt), bool), n, tile, codes=codes, window=window, sink=sink),
        return_lse=True,
    )
    assert o.shape == q.shape
    assert rel_err(o, ref) <= TOLERANCE[dtype]
    assert_lse_close(lse, ref_lse)


def test_chunked_reference_matches_dense_reference():
    b, n, hq, hkv, d, tile = 1, 128, 4, 2, 64, 16
    q, k, v = qkv(21, b, n, hq, hkv, d, jnp.bfloat16)
    nt = n // tile
    tm = random_tiles(5, b, hkv, nt, 0.5)
    codes = jax.random.randint(jax.random.PRNGKey(8), (b, hkv, n), 0, 3)
    o = chunked_reference_attention(q, k, v, tm, tile=tile, codes=codes, window=9, chunk=32)
    ref = reference_attention(q, k, v, tiled_token_mask(tm, n, tile, codes=codes, window=9))
    # The same float32 attention on 32-row chunks: the exp-sum and P·V over ≤ 128 keys may reorder
    # (float32_bound(128, depth 2) = 9.5e-6 of the largest output; measured 9e-8).
    bound = float32_bound(n, depth=2) * float(np.max(np.abs(ref)))
    np.testing.assert_allclose(np.asarray(o), np.asarray(ref), rtol=0, atol=bound)


def test_shape_checks():
    q, k, v = qkv(0, 1, 64, 4, 1, 64, jnp.float32)
    with pytest.raises(ValueError, match="dtype"):
        block_sparse_attention(q, k, v, jnp.ones((1, 1, 2, 2), bool), tile=32)
    q, k, v = qkv(0, 1, 64, 4, 1, 64, jnp.bfloat16)
    with pytest.raises(ValueError, match="tile_mask"):
        block_sparse_attention(q, k, v, jnp.ones((1, 3, 2, 2), bool), tile=32)


# ---------------------------------------------------------------- backward


def test_transpose_schedule_lists_query_tiles_of_each_key_tile():
    mask = jax.random.bernoulli(jax.random.PRNGKey(1), 0.4, (1, 2, 7, 7))
    counts, indices = transpose_schedule(mask)[:2]
    causal = np.tril(np.ones((7, 7), bool))
    want = np.asarray(mask) & causal
    for r, kj in itertools.product(range(2), range(7)):
        listed = np.asarray(indices[0, r, kj, : int(counts[0, r, kj])])
        np.testing.assert_array_equal(listed, np.flatnonzero(want[0, r, :, kj]))


def _grads(fn, q, k, v, cotangent):
    return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * cotangent), argnums=(0, 1, 2))(q, k, v)


def _check_grads_against_reference(q, k, v, mask, fn, dtype):
    ct = jax.random.normal(jax.random.PRNGKey(99), q.shape, jnp.float32)
    got = _grads(fn, q, k, v, ct)
    up = [x.astype(jnp.float32) for x in (q, k, v)]
    want = _grads(lambda q, k, v: reference_attention(q, k, v, mask), *up, ct)
    for name, g, w in zip("qkv", got, want, strict=True):
        assert g.dtype == dtype
        assert rel_err(g, w) <= TOLERANCE[dtype], name


@pytest.mark.parametrize(
    "routing,n,dtype,use_codes",
    [("kv", 100, jnp.bfloat16, False), ("q", 96, jnp.float16, True)],
)
def test_backward_matches_grad_of_reference(routing, n, dtype, use_codes):
    b, hq, hkv, d, tile, window = 2, 4, 1, 64, 32, 9
    q, k, v = qkv(n + 1, b, n, hq, hkv, d, dtype)
    r = hkv if routing == "kv" else hq
    nt = -(-n // tile)
    tm = random_tiles(n + 2, b, r, nt, 0.5)
    codes = jax.random.randint(jax.random.PRNGKey(n), (b, r, n), 0, 3) if use_codes else None
    mask = tiled_token_mask(tm, n, tile, codes=codes, window=window)
    fn = lambda q, k, v: block_sparse_attention(q, k, v, tm, tile=tile, codes=codes, window=window)  # noqa: E731
    _check_grads_against_reference(q, k, v, mask, fn, dtype)


@pytest.mark.parametrize("routing", ["kv", "q"])
def test_dkv_kernel_in_slices_equals_the_whole_tile(routing):
    """dk/dv programs of 16 keys walking 16 query rows at a time: the same sums as whole 32-tiles, float32."""
    from pallas_kernels.block_sparse_attention.backward import sparse_attention_backward, transpose_schedule
    from pallas_kernels.block_sparse_attention.forward import sparse_attention_forward

    b, n, hq, hkv, d, tile, window = 2, 96, 4, 1, 64, 32, 9
    q, k, v = qkv(7, b, n, hq, hkv, d, jnp.float32)
    r = hkv if routing == "kv" else hq
    tm = random_tiles(8, b, r, n // tile, 0.6)
    codes = jax.random.randint(jax.random.PRNGKey(9), (b, r, n), 0, 3)
    args = dict(tile=tile, rule=Rule.CODES, codes=codes, window=window, interpret=True)
    o, lse = sparse_attention_forward(q, k, v, build_schedule(tm), **args)
    do = jax.random.normal(jax.random.PRNGKey(10), q.shape, jnp.float32)
    schedules = build_schedule(tm), transpose_schedule(tm)
    whole = sparse_attention_backward(q, k, v, o, lse, do, None, *schedules, **args)
    for key_rows, query_rows in ((16, 16), (16, None), (None, 16)):
        sliced = sparse_attention_backward(q, k, v, o, lse, do, None, *schedules, **args, dkv_key_rows=key_rows,
                                           dkv_query_rows=query_rows)
        # The same float32 sums grouped 16 rows at a time instead of 32: dSᵀ·Q and Pᵀ·dO over the 96 query rows
        # may reorder, one sum deep (float32_bound(96) = 5.8e-6).
        for name, a, e in zip("qkv", sliced, whole, strict=True):
            assert rel_err(a, e) <= float32_bound(n), (key_rows, query_rows, name)


def test_token_routed_backward_matches_grad_of_reference():
    """Gradients flow through the sort, both passes, and the lse merge (lse cotangents)."""
    b, n, hq, hkv, d, tile, window = 1, 80, 4, 2, 64, 16, 12
    q, k, v = qkv(31, b, n, hq, hkv, d, jnp.float16)
    codes = jax.random.randint(jax.random.PRNGKey(31), (b, hkv, n), 0, 3)
    nt = -(-n // tile)
    mask = tiled_token_mask(jnp.ones((b, hkv, nt, nt), bool), n, tile, codes=codes, window=window)
    fn = lambda q, k, v: token_routed_attention(q, k, v, codes, tile=tile, window=window)  # noqa: E731
    _check_grads_against_reference(q, k, v, mask, fn, jnp.float16)


def test_reference_gradients_match_finite_differences():
    """The oracle of the backward tests is itself right (float32, tiny, central differences)."""
    q, k, v = (x.astype(jnp.float32) for x in qkv(41, 1, 8, 2, 1, 4, jnp.float32))
    mask = tiled_token_mask(random_tiles(2, 1, 1, 4, 0.5), 8, 2, codes=jnp.arange(8)[None, None] % 3, window=1)
    # Central differences at eps = 1e-3 in float32: truncation eps²/6 × the third derivative ≈ 2e-7, rounding
    # u·|f|/eps ≈ 6e-5 of f's scale per element, and check_grads contracts the 64 outputs with a random cotangent,
    # where √64 = 8 such errors add up: 8 × 6e-5, ×10 margin = 4.8e-3 (passes at 3e-5 here).
    eps = 1e-3
    tolerance = 10 * np.sqrt(q.size) * F32_U / eps
    check_grads(
        lambda q, k, v: reference_attention(q, k, v, mask),
        (q, k, v),
        order=1,
        modes=["rev"],
        eps=eps,
        atol=tolerance,
        rtol=tolerance,
    )


def test_backend_dispatch_on_cpu():
    q, k, v = qkv(0, 1, 64, 2, 1, 64, jnp.bfloat16)
    with pytest.raises(ValueError, match="hopper"):
        block_sparse_attention(q, k, v, jnp.ones((1, 1, 2, 2), bool), tile=32, backend="hopper")
    with pytest.raises(ValueError, match="backend"):
        block_sparse_attention(q, k, v, jnp.ones((1, 1, 2, 2), bool), tile=32, backend="cuda")


# ---------------------------------------------------------------- GPU only (skipped on CPU / CI)

on_hopper = pytest.mark.skipif(
    not hopper_supported(jnp.zeros((1, 1, 1, 128), jnp.bfloat16), 128), reason="needs a Hopper GPU"
)


@on_hopper
@pytest.mark.parametrize("dtype,d,routing", [(jnp.bfloat16, 128, "kv"), (jnp.float16, 64, "q")])
def test_hopper_kernel_matches_reference(dtype, d, routing):
    b, n, hq, hkv, tile = 2, 1000, 8, 2, 128
    q, k, v = qkv(d, b, n, hq, hkv, d, dtype)
    r = hkv if routing == "kv" else hq
    nt = -(-n // tile)
    tm = random_tiles(d, b, r, nt, 0.4)
    o, lse = block_sparse_attention(q, k, v, tm, return_lse=True, backend="hopper")
    ref, ref_lse = reference_attention(q, k, v, tiled_token_mask(tm, n, tile), return_lse=True)
    assert rel_err(o, ref) <= TOLERANCE[dtype]
    assert_lse_close(lse, ref_lse)
    _check_grads_against_reference(
        q, k, v, tiled_token_mask(tm, n, tile), lambda q, k, v: block_sparse_attention(q, k, v, tm), dtype
    )


@pytest.mark.parametrize(("n", "tile", "window", "num_codes"), [(200, 16, 20, 3), (256, 32, 0, 8), (130, 64, None, 2)])
def test_executed_tiles_are_the_schedules_the_kernel_is_given(n, tile, window, num_codes):
    """Every report and baseline counts `mask.executed_tiles`: it must equal the active tiles of the two
    schedules `token_routed_attention` builds (bucket pass over sorted codes, and every band tile)."""
    from llama_surgery_jax.surgery.mask import executed_tiles
    from pallas_kernels.block_sparse_attention import token_routed_tiles

    seed = int(np.random.SeedSequence().entropy % 2**31)
    codes = jax.random.randint(jax.random.key(seed), (2, 3, n), 0, num_codes)
    bucket, band = token_routed_tiles(codes, tile=tile, window=window, sink=True)
    given = (build_schedule(bucket).counts.sum(-1)
             + build_schedule(jnp.broadcast_to(band, bucket.shape)).counts.sum(-1))
    np.testing.assert_array_equal(executed_tiles(codes, tile=tile, window=window, sink=True), given,
                                  err_msg=f"seed {seed}")


def test_bench_exits_non_zero_when_a_check_crashes(monkeypatch, capsys):
    """The bench logs a crashed section and goes on, but its exit code says the run failed."""
    from pallas_kernels.block_sparse_attention import bench

    monkeypatch.setattr(bench, "tune", lambda log: (8, 3, {}))
    monkeypatch.setattr(bench, "grad_check", lambda log, result: None)
    monkeypatch.setattr(bench, "correctness", lambda log, result: None)
    args = ["--lengths", "64", "--budget-s", "0", "--no-torch"]  # budget 0: no timing rows
    assert bench.main(args) == 0

    def crash(log, result):
        raise RuntimeError("a kernel that no longer compiles")

    monkeypatch.setattr(bench, "correctness", crash)
    assert bench.main(args) == 1
    out = capsys.readouterr().out
    assert "FAILED: crash" in out and "a kernel that no longer compiles" in out
