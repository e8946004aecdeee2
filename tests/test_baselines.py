"""Baselines at matched block density: streaming (sink + local blocks) and untrained MoBA-style gating."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import F32_U, attention_order_bound, fresh_seed
from flax import nnx

from llama_surgery_jax.model.config import ModelConfig
from llama_surgery_jax.model.llama import LlamaForCausalLM
from llama_surgery_jax.surgery.baselines import (
    baseline_block_density,
    extra_blocks_for_density,
    install_baseline,
    moba_tiles,
    streaming_tiles,
)

# At full density a baseline attends to every causal pair with its own chunked softmax (exp / sum) against
# dense_attention's jax.nn.softmax: float32 reassociation of the softmax sum and P·V over 64 keys, 2 layers
# (conftest.attention_order_bound: 9.5e-6 of the largest logit; measured 2.8e-7).
TINY = ModelConfig.named("tiny")
LOGITS_RTOL = attention_order_bound(64, TINY.hidden_size, TINY.num_hidden_layers)


@pytest.mark.parametrize("n", [1, 2, 5, 16])
def test_both_baselines_compute_the_same_tiles_per_row(n):
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(2, n * 8 - 3, 4, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, n * 8 - 3, 2, 8)), jnp.float32)
    for extra in range(n + 1):
        stream = streaming_tiles(n, extra)
        moba = moba_tiles(q, k, tile=8, extra=extra)
        np.testing.assert_array_equal(jnp.sum(moba, -1), jnp.broadcast_to(jnp.sum(stream, -1), moba.shape[:-1]),
                                      err_msg=f"seed {seed}, extra {extra}")
        assert not jnp.any(moba & ~jnp.tril(jnp.ones((n, n), bool))), f"seed {seed}: a tile above the diagonal"
        assert jnp.all(moba[..., 0]) and jnp.all(jnp.diagonal(moba, axis1=-2, axis2=-1)), f"seed {seed}: sink, diagonal"
        # Both a count of tiles over the count of causal tiles, each divided once in float64: equal to a rounding.
        density = float(jnp.mean(jnp.sum(stream))) / (n * (n + 1) / 2)
        assert density == pytest.approx(baseline_block_density(n, extra), rel=10 * F32_U), (seed, extra)


def test_density_matching():
    assert extra_blocks_for_density(8, 1.0) == 6  # sink + diagonal + 6 = every causal tile of row 7
    assert baseline_block_density(8, 6) == 1.0
    e = extra_blocks_for_density(64, 0.3)
    assert abs(baseline_block_density(64, e) - 0.3) <= abs(baseline_block_density(64, e + 1) - 0.3)


@pytest.mark.parametrize("kind", ["streaming", "moba"])
def test_full_density_is_dense_and_sparse_is_causal(kind):
    seed = fresh_seed()
    model = LlamaForCausalLM(ModelConfig.named("tiny"), rngs=nnx.Rngs(seed))
    tokens = jax.random.randint(jax.random.key(seed), (2, 64), 0, TINY.vocab_size)
    forward = nnx.jit(lambda m, x: m(x))  # a program per attention, not the ops dispatched one by one
    dense, _ = forward(model, tokens)
    install_baseline(model, kind, extra=8, tile=8)  # 8 blocks: every causal tile
    full, aux = forward(model, tokens)
    assert all(float(a["block_density"]) == 1.0 for a in aux), f"seed {seed}"
    np.testing.assert_allclose(full, dense, atol=LOGITS_RTOL * float(jnp.max(jnp.abs(dense))), err_msg=f"seed {seed}")
    install_baseline(model, kind, extra=1, tile=8)
    sparse, aux = forward(model, tokens)
    # A tile count over the causal tile count, one float32 division against the float64 ratio: ≤ u (×10).
    assert float(aux[0]["block_density"]) == pytest.approx(baseline_block_density(8, 1), rel=10 * F32_U), seed
    # Far above float32 noise (LOGITS_RTOL of logits below 1): a mask that changed nothing is caught (measured ~0.3).
    assert float(jnp.max(jnp.abs(sparse - dense))) > 1e-3, f"seed {seed}: a sparse mask should change the logits"
    changed = tokens.at[:, 40:].set((tokens[:, 40:] + 1) % 512)
    np.testing.assert_array_equal(forward(model, changed)[0][:, :40], sparse[:, :40],
                                  err_msg=f"seed {seed}: not causal")
