"""The hard mask and what the kernels run (METHOD.md §4, §9): sink, window, causality, tiles, sorting."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from conftest import F32_U
from hypothesis import given, settings
from hypothesis import strategies as st

from llama_surgery_jax.surgery.config import RouterConfig
from llama_surgery_jax.surgery.mask import (
    band_pass_tiles,
    band_tiles,
    block_density,
    bucket_permutation,
    bucket_tiles,
    tile_mask,
    token_density,
    token_mask,
)
from llama_surgery_jax.surgery.router import hard_topology, init_router_params, route

# Each example draws new shapes (t, heads, tile, window), so each compiles anew: 10 per run, fresh every run.
PROPERTY = settings(deadline=None, max_examples=10)
WINDOWS = st.one_of(st.none(), st.integers(0, 20))


def full_mask(codes, window, sink):
    """The N × N oracle: codes [..., t] → bool [..., t, t]."""
    positions = jnp.arange(codes.shape[-1])
    return token_mask(codes, codes, positions, positions, window=window, sink=sink)


def tile_or(mask, tile):
    """Tile-wise OR of a [..., t, t] mask (ragged last tile padded with False)."""
    t = mask.shape[-1]
    n = -(-t // tile)
    padded = np.zeros(mask.shape[:-2] + (n * tile, n * tile), bool)
    padded[..., :t, :t] = mask
    return padded.reshape(*mask.shape[:-2], n, tile, n, tile).any(axis=(-3, -1))


@st.composite
def code_arrays(draw, max_t=40):
    t = draw(st.integers(1, max_t))
    num_codes = draw(st.sampled_from([1, 2, 3, 8, 64]))
    heads = draw(st.integers(1, 3))
    values = draw(st.lists(st.integers(0, num_codes - 1), min_size=heads * t, max_size=heads * t))
    return jnp.asarray(values, jnp.int32).reshape(1, heads, t)


@PROPERTY
@given(code_arrays(), WINDOWS, st.booleans())
def test_sink_window_diagonal_always_visible_and_causal(codes, window, sink):
    mask = np.asarray(full_mask(codes, window, sink))
    t = codes.shape[-1]
    i, j = np.meshgrid(np.arange(t), np.arange(t), indexing="ij")
    assert not mask[..., j > i].any()
    assert mask[..., i == j].all()
    if sink:
        assert mask[..., :, 0].all()
    if window is not None:
        assert mask[..., (i - j >= 0) & (i - j <= window)].all()
    same = np.asarray(codes)[..., :, None] == np.asarray(codes)[..., None, :]
    rule = same | (i == j) | (sink & (j == 0)) | ((window is not None) & (i - j <= (window or 0)))
    np.testing.assert_array_equal(mask, rule & (j <= i))


@PROPERTY
@given(code_arrays(), st.sampled_from([1, 4, 8, 16]), WINDOWS, st.booleans())
def test_tile_mask_from_code_sets_is_the_tile_or_of_the_token_mask(codes, tile, window, sink):
    mask = np.asarray(full_mask(codes, window, sink))
    tiles = np.asarray(tile_mask(codes, tile=tile, window=window, sink=sink))
    np.testing.assert_array_equal(tiles, tile_or(mask, tile))
    # What a kernel computes: the token rule inside computed tiles only, nothing elsewhere.
    t = codes.shape[-1]
    computed = np.repeat(np.repeat(tiles, tile, axis=-2), tile, axis=-1)[..., :t, :t]
    np.testing.assert_array_equal(np.where(computed, mask, False), mask)


@PROPERTY
@given(code_arrays(max_t=70), WINDOWS, st.booleans())
def test_token_density_counts_the_full_mask(codes, window, sink):
    t = codes.shape[-1]
    expected = np.asarray(full_mask(codes, window, sink)).sum() / (codes.size // t * t * (t + 1) / 2)
    # Integer counts, exact in float32, then one division: ≤ u from the exact ratio (×10 margin).
    np.testing.assert_allclose(token_density(codes, window=window, sink=sink, chunk=16), expected, rtol=10 * F32_U)


@functools.partial(jax.jit, static_argnames=("config",))
def routed_codes(params, x, config):
    return route(params, x, config=config, routing_heads=2).codes


@PROPERTY
@given(st.sampled_from(["token", "block_prefix"]), st.integers(0, 22), WINDOWS, st.booleans())
def test_row_i_never_depends_on_later_tokens(mode, i, window, sink):
    config = RouterConfig(p=2, levels=3, d_max=1, mode=mode, block_size=4, window=window, sink=sink)
    params = init_router_params(jax.random.key(0), 8, 2, config, homotopy=False)
    x = jax.random.normal(jax.random.key(1), (1, 23, 8))
    later = jnp.where(jnp.arange(23)[None, :, None] > i, -3.0 * x + 1.0, x)
    rows = full_mask(routed_codes(params, x, config), window, sink)[..., : i + 1, :]
    perturbed = full_mask(routed_codes(params, later, config), window, sink)[..., : i + 1, :]
    np.testing.assert_array_equal(rows, perturbed)


@PROPERTY
@given(code_arrays(), st.sampled_from([1, 4, 8, 16]), WINDOWS, st.booleans())
def test_band_pass_tiles_are_the_tile_or_of_band_pairs_with_different_codes(codes, tile, window, sink):
    mask = np.asarray(full_mask(codes, window, sink))
    c = np.asarray(codes)
    different = c[..., :, None] != c[..., None, :]
    expected = tile_or(mask & different, tile)
    np.testing.assert_array_equal(band_pass_tiles(codes, tile=tile, window=window, sink=sink), expected)


def test_band_tiles_cover_window_and_sink():
    band = np.asarray(band_tiles(6, tile=4, window=5, sink=True))
    # qb − kb − 1 blocks lie between; the nearest pair is (qb − kb − 1)·4 + 1 apart: ≤ 5 for qb − kb ≤ 2.
    expected = np.array([[qb >= kb and (qb - kb <= 2 or kb == 0) for kb in range(6)] for qb in range(6)])
    np.testing.assert_array_equal(band, expected)


def test_sorting_makes_buckets_contiguous_and_causal():
    codes = jax.random.randint(jax.random.key(0), (2, 3, 50), 0, 5)
    perm = np.asarray(bucket_permutation(codes))
    sorted_codes = np.take_along_axis(np.asarray(codes), perm, -1)
    assert np.all(np.diff(sorted_codes, axis=-1) >= 0)
    same_code_next = np.diff(sorted_codes, axis=-1) == 0
    assert np.all(np.diff(perm, axis=-1)[same_code_next] > 0)  # positions increase inside a bucket
    # Every same-code causal pair lands in a computed tile of the bucket pass.
    tiles = np.asarray(bucket_tiles(codes, tile=8))
    positions = perm
    pair = (sorted_codes[..., :, None] == sorted_codes[..., None, :]) & (
        positions[..., None, :] <= positions[..., :, None])
    assert not np.any(tile_or(pair, 8) & ~tiles)
    # With 5 buckets of ~10 tokens, sorting leaves far fewer tiles than the 21 causal ones.
    assert float(block_density(tiles)) < 0.6


def test_hard_topology_at_homotopy_init_is_dense():
    config = RouterConfig(p=3, levels=4, d_max=2, window=None, sink=False)
    params = init_router_params(jax.random.key(0), 8, 2, config)
    topo = hard_topology(params, jax.random.normal(jax.random.key(1), (2, 37, 8)), config=config,
                         routing_heads=2, tile=16)
    assert topo.codes.shape == (2, 2, 37) and topo.codes.dtype == jnp.int32
    assert topo.tile_mask.shape == (2, 2, 3, 3)
    causal = np.tril(np.ones((3, 3), bool))
    np.testing.assert_array_equal(topo.tile_mask, np.broadcast_to(causal, (2, 2, 3, 3)))
    assert float(block_density(topo.tile_mask)) == 1.0
    assert float(token_density(topo.codes, window=None, sink=False)) == 1.0


def test_tile_mask_memory_is_linear():
    """A routed layer builds its tile mask every step: compiled scratch must grow with t, not t² · tile.
    (Before one query block per step, the pairwise lookup held [b·h, n, n, tile]: 321 MiB at 8k and 5.0 GiB
    at 32k for 32 heads; now 6.1 and 26 MiB.)"""

    def scratch(t):
        codes = jax.ShapeDtypeStruct((1, 32, t), jnp.int32)
        compiled = jax.jit(lambda c: tile_mask(c, tile=128, window=128, sink=True)).lower(codes).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    small, large = scratch(8192), scratch(32768)
    # 4× the tokens: linear scratch grows 4×, t² · tile 16×; ×1.5 leaves room for buffers of fixed size.
    assert large / small < 4 * 1.5, f"{small / 2**20:.1f} → {large / 2**20:.1f} MiB for 4× the tokens"
    # The codes themselves (4 MiB at 32k) times a few: sorted block copies, the per-step lookup, the mask.
    assert large < 16 * 32 * 32768 * 4, f"{large / 2**20:.1f} MiB"
