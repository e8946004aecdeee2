"""Block-sparse decode kernel vs a float64 numpy oracle (CPU: Pallas interpret mode).

Interpret mode fills Pallas outputs with NaN before the kernel runs, so a partial that a program never wrote
fails the finiteness checks. The oracle is written from the visibility rule alone (decode.py's docstring),
not from the JAX reference, so the JAX reference and the gather baseline are checked against it too.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import BF16_U, float32_bound, fresh_seed

from pallas_kernels.block_sparse_attention import (
    decode_splits,
    dense_decode_attention,
    gather_decode_attention,
    sparse_decode_attention,
)
from pallas_kernels.block_sparse_attention.decode import reference_decode_attention

SLOTS, TILE, LENGTHS, MAX_BLOCKS = 256, 32, (37, 200, 255), 5


def float32_decode_bound(head_dim: int, slots: int, blocks: int) -> float:
    """Bound on max|Δ| / max|oracle| for o, and on |Δlse| relative to 1 + |lse|, between the kernel's float32
    arithmetic and float64 on the same float32 inputs (exact in float64, so only the kernel's roundings count).

    Sums in a row whose roundings add (conftest.float32_bound's random-walk model): the score over head_dim
    products, the softmax normaliser and P·V over ≤ slots keys (3 sums of ≤ max(head_dim, slots) terms), one
    rescale of the online softmax per block, and the split merge: depth 4 + blocks. 256 slots, 8 blocks:
    float32_bound(256, depth 12) = 3.3e-5 (measured ≈ 3.7e-7 for o, 5.5e-7 for lse).
    """
    return float32_bound(max(head_dim, slots), depth=4 + blocks)


# bf16: scores are float32 sums of exact bf16 products (as above, ≪ u); the kernel then rounds P to bf16 before
# P·V (each weight by ≤ u = 2^-8) and o to bf16 once (≤ u): ≤ 2u = 7.8e-3 of each element when the terms of
# o do not cancel; random-signed rounding errors of P move o by ≈ u/√3 of itself even when they do. The oracle
# runs in float64 on the same bf16-rounded inputs, so input rounding is not part of the error. As
# tests/test_kernels.py's TOLERANCE for bf16: 1e-2 (2.6u) on ‖Δ‖ / ‖oracle‖ (measured 2.1e-3).
BF16_TOLERANCE = 1e-2
assert BF16_TOLERANCE >= 2 * BF16_U


def decode_inputs(seed, hq, hkv, d, dtype, *, tile=TILE, slots=SLOTS, lengths=LENGTHS, max_blocks=MAX_BLOCKS):
    """Fresh q [b, hq, d], caches [b, slots, hkv, d] and ragged block lists [b, hkv, max_blocks].

    Each list holds distinct blocks in random order, always block 0 and the block of the new token, often
    blocks past the written length, then garbage ids past its count. Row (0, 0) is always short (just its two
    required blocks) and row (b - 1, hkv - 1) always full, so both kinds occur whatever the seed.
    """
    b = len(lengths)
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(kq, (b, hq, d), dtype)
    k_cache = jax.random.normal(kk, (b, slots, hkv, d), dtype)
    v_cache = jax.random.normal(kv, (b, slots, hkv, d), dtype)
    rng = np.random.default_rng(seed)
    n_blocks = slots // tile
    ids = np.zeros((b, hkv, max_blocks), np.int32)
    counts = np.zeros((b, hkv), np.int32)
    for bi in range(b):
        required = sorted({0, lengths[bi] // tile})
        others = rng.permutation([i for i in range(n_blocks) if i not in required])
        for h in range(hkv):
            count = int(rng.integers(len(required), max_blocks + 1))
            if (bi, h) == (0, 0):
                count = len(required)
            if (bi, h) == (b - 1, hkv - 1):
                count = max_blocks
            listed = rng.permutation(np.concatenate([required, others[: count - len(required)]]))
            garbage = rng.integers(-(10**6), 10**6, max_blocks - count)
            ids[bi, h] = np.concatenate([listed, garbage])
            counts[bi, h] = count
    lengths = jnp.asarray(lengths, jnp.int32)
    return q, k_cache, v_cache, jnp.asarray(ids), jnp.asarray(counts), lengths


def numpy_oracle(q, k_cache, v_cache, block_ids, block_counts, lengths, *, tile):
    """float64 attention of each query head over the keys the rule makes visible: (o [b, hq, d], lse [b, hq])."""
    q, k_cache, v_cache = (np.asarray(x, np.float64) for x in (q, k_cache, v_cache))
    block_ids, block_counts, lengths = (np.asarray(x) for x in (block_ids, block_counts, lengths))
    b, hq, d = q.shape
    hkv = k_cache.shape[2]
    group = hq // hkv
    o = np.zeros((b, hq, d))
    lse = np.full((b, hq), -np.inf)
    for bi in range(b):
        for h in range(hq):
            kh = h // group
            seen = [
                j
                for blk in block_ids[bi, kh, : block_counts[bi, kh]]
                for j in range(blk * tile, (blk + 1) * tile)
                if j <= lengths[bi]
            ]
            if not seen:
                continue
            s = k_cache[bi, seen, kh] @ q[bi, h] / np.sqrt(d)
            top = s.max()
            w = np.exp(s - top)
            lse[bi, h] = top + np.log(w.sum())
            o[bi, h] = w @ v_cache[bi, seen, kh] / w.sum()
    return o, lse


def check_float32(o, lse, ref_o, ref_lse, bound):
    o, lse = np.asarray(o), np.asarray(lse)
    assert np.isfinite(o).all(), "unwritten (NaN) or non-finite output"
    assert np.array_equal(np.isneginf(lse), np.isneginf(ref_lse)), "empty rows differ"
    assert np.abs(o - ref_o).max() <= bound * np.abs(ref_o).max()
    finite = np.isfinite(ref_lse)
    np.testing.assert_allclose(lse[finite], ref_lse[finite], rtol=bound, atol=bound)


@pytest.mark.parametrize(
    "hq,hkv,d,tile,max_blocks,splits",
    [
        (8, 2, 64, 32, 5, 1),  # GQA 4:1, one split
        (8, 1, 128, 32, 5, 3),  # GQA 8:1, d 128, three splits: rows of fewer than 3 blocks leave some empty
        (4, 1, 64, 32, 5, 8),  # more splits than list entries: splits 5..7 always empty
        (8, 2, 128, 64, 3, 2),  # tile 64 (4 blocks): the new token of sequence 0 shares block 0 with the sink
    ],
)
def test_kernel_matches_float64_oracle_float32(hq, hkv, d, tile, max_blocks, splits):
    inputs = decode_inputs(fresh_seed(), hq, hkv, d, jnp.float32, tile=tile, max_blocks=max_blocks)
    counts = np.asarray(inputs[4])
    assert (counts < max_blocks).any() and (counts == max_blocks).any(), "short and full lists both occur"
    if splits > 1:
        assert (counts < splits).any(), "some split has nothing to read"
    o, lse = sparse_decode_attention(*inputs, tile=tile, splits=splits, interpret=True, return_lse=True)
    assert o.shape == (len(LENGTHS), hq, d) and o.dtype == jnp.float32 and lse.shape == (len(LENGTHS), hq)
    ref_o, ref_lse = numpy_oracle(*inputs, tile=tile)
    check_float32(o, lse, ref_o, ref_lse, float32_decode_bound(d, SLOTS, SLOTS // tile))


@pytest.mark.parametrize("splits", [1, 3])
def test_kernel_matches_float64_oracle_bf16(splits):
    hq, hkv, d = 8, 2, 128
    inputs = decode_inputs(fresh_seed(), hq, hkv, d, jnp.bfloat16)
    o, lse = sparse_decode_attention(*inputs, tile=TILE, splits=splits, interpret=True, return_lse=True)
    assert o.dtype == jnp.bfloat16
    ref_o, ref_lse = numpy_oracle(*inputs, tile=TILE)
    o = np.asarray(o, np.float64)
    assert np.isfinite(o).all(), "unwritten (NaN) or non-finite output"
    assert np.linalg.norm(o - ref_o) / np.linalg.norm(ref_o) <= BF16_TOLERANCE
    # lse sees only float32 score arithmetic on exact bf16 products: the float32 bound holds for it.
    bound = float32_decode_bound(d, SLOTS, SLOTS // TILE)
    np.testing.assert_allclose(np.asarray(lse), ref_lse, rtol=bound, atol=bound)


@pytest.mark.parametrize("splits", [1, 3])
def test_rows_that_see_nothing_give_zero_and_minus_inf(splits):
    """Count 0, and a list of blocks all past the written length: both rows see no key."""
    hq, hkv, d = 4, 2, 64
    q, k_cache, v_cache, ids, counts, lengths = decode_inputs(fresh_seed(), hq, hkv, d, jnp.float32)
    # Sequence 0 (length 37): KV head 0 lists nothing; KV head 1 lists only blocks 4 and 6, both unwritten.
    ids = ids.at[0, 1, :2].set(jnp.array([4, 6]))
    counts = counts.at[0].set(jnp.array([0, 2]))
    assert LENGTHS[0] < 4 * TILE
    inputs = (q, k_cache, v_cache, ids, counts, lengths)
    o, lse = sparse_decode_attention(*inputs, tile=TILE, splits=splits, interpret=True, return_lse=True)
    assert np.all(np.asarray(o[0]) == 0) and np.all(np.isneginf(np.asarray(lse[0])))
    ref_o, ref_lse = numpy_oracle(*inputs, tile=TILE)
    check_float32(o, lse, ref_o, ref_lse, float32_decode_bound(d, SLOTS, SLOTS // TILE))


def test_garbage_past_the_count_is_never_read():
    inputs = decode_inputs(fresh_seed(), 4, 1, 64, jnp.float32)
    ids, counts = inputs[3], inputs[4]
    assert (counts < MAX_BLOCKS).any()
    other = jnp.where(jnp.arange(MAX_BLOCKS) < counts[..., None], ids, 3)
    o1 = sparse_decode_attention(*inputs, tile=TILE, splits=3, interpret=True)
    o2 = sparse_decode_attention(*inputs[:3], other, *inputs[4:], tile=TILE, splits=3, interpret=True)
    np.testing.assert_array_equal(np.asarray(o1), np.asarray(o2))


@pytest.mark.parametrize("oracle", [reference_decode_attention, gather_decode_attention])
def test_jax_oracles_match_float64_oracle(oracle):
    hq, hkv, d = 8, 2, 128
    q, k_cache, v_cache, ids, counts, lengths = decode_inputs(fresh_seed(), hq, hkv, d, jnp.float32)
    inputs = (q, k_cache, v_cache, ids, counts.at[0, 0].set(0), lengths)  # one row that sees nothing
    o, lse = oracle(*inputs, tile=TILE, return_lse=True)
    ref_o, ref_lse = numpy_oracle(*inputs, tile=TILE)
    check_float32(o, lse, ref_o, ref_lse, float32_decode_bound(d, SLOTS, SLOTS // TILE))


def test_gather_baseline_bf16():
    hq, hkv, d = 8, 1, 64
    inputs = decode_inputs(fresh_seed(), hq, hkv, d, jnp.bfloat16)
    o = np.asarray(gather_decode_attention(*inputs, tile=TILE), np.float64)
    ref_o, _ = numpy_oracle(*inputs, tile=TILE)
    assert np.linalg.norm(o - ref_o) / np.linalg.norm(ref_o) <= BF16_TOLERANCE


@pytest.mark.parametrize("hq,hkv,d,splits", [(8, 2, 64, None), (8, 1, 128, 3)])
def test_dense_decode_is_attention_over_every_written_slot(hq, hkv, d, splits):
    """The dense baseline (flash-decoding through the same kernel): every slot ≤ the new token's, ragged lengths."""
    q, k_cache, v_cache, _, _, lengths = decode_inputs(fresh_seed(), hq, hkv, d, jnp.float32)
    o = dense_decode_attention(q, k_cache, v_cache, lengths, tile=TILE, splits=splits, interpret=True)
    every = jnp.broadcast_to(jnp.arange(SLOTS // TILE), (len(LENGTHS), hkv, SLOTS // TILE))
    ref_o, _ = numpy_oracle(q, k_cache, v_cache, every, jnp.full((len(LENGTHS), hkv), SLOTS // TILE), lengths,
                            tile=TILE)
    check_float32(o, np.zeros((len(LENGTHS), hq)), ref_o, np.zeros((len(LENGTHS), hq)),
                  float32_decode_bound(d, SLOTS, SLOTS // TILE))


def test_decode_splits():
    assert decode_splits(1, 8, 1024) == 32  # batch 1 at 128k: 256 programs
    assert decode_splits(8, 8, 256) == 4  # batch 8: 256 programs already at 4 splits
    assert decode_splits(1, 8, 64) == 2  # a short cache: one split per 32 blocks
    assert decode_splits(1, 3, 66) == 1  # SmolLM2 at 8k: a small step, no merge
    assert decode_splits(64, 8, 1024) == 1


def test_bad_inputs_raise():
    q, k_cache, v_cache, ids, counts, lengths = decode_inputs(0, 4, 2, 64, jnp.float32)
    kw = dict(tile=TILE, interpret=True)
    with pytest.raises(ValueError, match="multiple of tile"):
        sparse_decode_attention(q, k_cache[:, :-16], v_cache[:, :-16], ids, counts, lengths, **kw)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        sparse_decode_attention(q[:, :3], k_cache, v_cache, ids, counts, lengths, **kw)
    with pytest.raises(ValueError, match="block_ids"):
        sparse_decode_attention(q, k_cache, v_cache, ids[:, :1], counts, lengths, **kw)
    with pytest.raises(ValueError, match="block_counts"):
        sparse_decode_attention(q, k_cache, v_cache, ids, counts[:, :1], lengths, **kw)
    with pytest.raises(ValueError, match="tile must be"):
        sparse_decode_attention(q, k_cache, v_cache, ids, counts, lengths, tile=48, interpret=True)
    with pytest.raises(ValueError, match="dtype"):  # float32 needs interpret=True
        sparse_decode_attention(q, k_cache, v_cache, ids, counts, lengths, tile=TILE)
    with pytest.raises(ValueError, match="head dim"):
        sparse_decode_attention(q[..., :32], k_cache[..., :32], v_cache[..., :32], ids, counts, lengths, **kw)
