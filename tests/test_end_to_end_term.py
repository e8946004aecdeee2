"""The end-to-end term of row routing (METHOD.md §12, issue 22's direction 4): the straight-through tile attention's
forward is the tile-masked attention, its gradient is the derivative of the attention in the mask's weights (for
skipped blocks too), the output divergence vanishes where the surgery is dense, and a training step with the term
reaches every router parameter."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import float32_bound, fresh_seed
from flax import nnx
from test_row_routing import ROWS, TINY, random_first_rows, row_model

from llama_surgery_jax.model.config import ConfigError
from llama_surgery_jax.surgery.reference_attention import straight_through_tile_attention, tile_masked_attention
from llama_surgery_jax.surgery.router import RouterParam, RouterSchedule
from llama_surgery_jax.training.config import TrainConfig
from llama_surgery_jax.training.loop import make_train_step, output_divergence, train, vocab_matrix


def random_rows(seed: int, t: int = 45, tile: int = 8, heads: int = 4, kv: int = 2, d: int = 16):
    q, k, v, first = random_first_rows(seed, t, tile, heads, kv, d)
    soft = np.random.default_rng(seed + 2).uniform(0.1, 0.9, size=(1, kv, t, first.shape[-1])).astype(np.float32)
    return q, k, v, first, soft


def test_forward_is_the_tile_masked_attention():
    seed = fresh_seed()
    q, k, v, first, soft = random_rows(seed)
    args = [jnp.asarray(x) for x in (q, k, v)]
    out = straight_through_tile_attention(*args, jnp.asarray(first), jnp.asarray(soft), tile=8, chunk=16)
    expected = tile_masked_attention(*args, jnp.asarray(first < 8), tile=8, chunk=16, first_rows=jnp.asarray(first))
    # The same float32 sums over ≤ 45 keys (the multiplier is 1 or 0 exactly); only XLA's fusion may differ.
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=float32_bound(45) * np.abs(v).max(),
                               err_msg=f"seed {seed}")


def test_gradient_is_the_attention_derivative_in_the_mask_weights():
    """L = Σ w · O. With weights m on the keys (m = the hard mask, 1 or 0), O_i = Σ_s m_is e_is v_s / Σ_s m_is e_is
    over the causal keys, so ∂L/∂m_is = e_is w_i · (v_s − O_i) / Z_i, and ∂L/∂soft(i, j) sums it over block j's
    causal keys and the query heads of a routing head: nonzero for skipped blocks too. float64 against float32."""
    seed = fresh_seed()
    t, tile, heads, kv, d = 45, 8, 4, 2, 16
    q, k, v, first, soft = random_rows(seed, t, tile, heads, kv, d)
    w = np.random.default_rng(seed + 1).normal(size=(1, t, heads, d)).astype(np.float32)

    def loss(soft):
        out = straight_through_tile_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(first),
                                              soft, tile=tile, chunk=16)
        return jnp.sum(out * w)

    grad = np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(soft)))[0]  # [kv, t, n]
    pos = np.arange(t)
    seen = first[0][:, pos // tile][:, :, pos // tile] <= (pos % tile)[None, :, None]  # [kv, t, t]
    causal = pos[None, :] <= pos[:, None]
    expected = np.zeros_like(grad, np.float64)
    for h in range(heads):
        g = h // (heads // kv)
        s = np.einsum("td,sd->ts", q[0, :, h].astype(np.float64), k[0, :, g].astype(np.float64)) / math.sqrt(d)
        top = np.where(seen[g] & causal, s, -np.inf).max(-1, keepdims=True)
        e = np.where(causal, np.exp(s - top), 0.0)
        m = (seen[g] & causal).astype(np.float64)
        z = (m * e).sum(-1, keepdims=True)
        out = (m * e) @ v[0, :, g].astype(np.float64) / z  # [t, d]
        per_key = e * ((w[0, :, h] @ v[0, :, g].T.astype(np.float64)) - (w[0, :, h] * out).sum(-1)[:, None]) / z
        for j in range(-(-t // tile)):
            expected[g, :, j] += per_key[:, j * tile:(j + 1) * tile].sum(-1)
    not_seen = first[0][:, pos // tile] > (pos % tile)[None, :, None]  # [kv, t, n]
    skipped = not_seen & (np.arange(first.shape[-1]) <= (pos // tile)[:, None])
    assert np.any(np.abs(expected[skipped]) > 0), "some skipped block has a gradient to compare"
    # A backward pass of a few float32 sums over ≤ 45 keys (scores, softmax, P·V and their transposes).
    scale = np.abs(expected).max()
    np.testing.assert_allclose(grad, expected, atol=float32_bound(t, depth=4) * scale, err_msg=f"seed {seed}")


def test_output_divergence_vanishes_when_every_tile_runs():
    """At ρ = 1, with a block's first row allowed its whole quota (row_front 1), the router's tiles are all of them
    from row 0: the surgery is the dense model, and KL(dense ‖ surgery) is 0 up to float32 (the two attentions add
    in other orders), while at ρ 0.4 it is positive."""
    seed = fresh_seed()
    model = row_model(seed, dataclasses.replace(ROWS, row_front=1.0))
    tokens = jax.random.randint(jax.random.key(seed), (2, 64), 0, TINY.vocab_size)

    @nnx.jit
    def divergence(model, tokens, rho):
        dense, _, _ = model.hidden_states(tokens, train=True)
        sparse, _, _ = model.hidden_states(tokens, train=True, straight_through=True, block_density=rho)
        log_p = jax.nn.log_softmax(model.logits(dense), axis=-1)
        return output_divergence(vocab_matrix(model), dense, sparse, chunk=24), jnp.max(jnp.abs(log_p))

    (full, log_scale), (sparse, _) = divergence(model, tokens, 1.0), divergence(model, tokens, 0.4)
    full, sparse = float(full), float(sparse)
    # KL = Σ_v p_v (log p_v − log q_v): the two log-softmaxes round apart by ~u·max|log p| each, a first-order error
    # that the p-weighted sum over the vocabulary adds like a random walk (`float32_bound` of V terms), above the
    # second-order δ²/2 of the logits' own difference, which is smaller still.
    bound = float32_bound(TINY.vocab_size) * float(log_scale)
    assert full <= bound, f"seed {seed}: {full} > {bound}"
    assert sparse > 100 * max(full, 1e-12), f"seed {seed}: {sparse} against {full}"


def test_a_training_step_with_the_term_reaches_every_router_parameter():
    seed = fresh_seed()
    model = row_model(seed)
    tokens = jax.random.randint(jax.random.key(seed), (2, 64), 0, TINY.vocab_size)
    graphdef, routers, frozen = nnx.split(model, RouterParam, ...)
    captured = {}

    def sgd_grads(grads, state, params=None):
        captured["grads"] = grads
        return grads, state

    probe = optax.GradientTransformation(lambda params: optax.EmptyState(), sgd_grads)
    step = make_train_step(graphdef, RouterSchedule(), probe, block_mode=True, output_kl=1.0)
    _, _, metrics = step(routers, probe.init(routers), frozen, tokens, jnp.int32(0), jnp.int32(seed))
    assert np.isfinite(float(metrics["loss"])) and float(metrics["output_kl"]) > 0, f"seed {seed}: {metrics}"
    for path, leaf in jax.tree_util.tree_leaves_with_path(captured["grads"]):
        leaf = np.asarray(leaf)
        assert np.all(np.isfinite(leaf)), f"seed {seed}: non-finite gradient at {jax.tree_util.keystr(path)}"
        assert np.any(leaf != 0), f"seed {seed}: zero gradient at {jax.tree_util.keystr(path)}"


def test_the_term_is_refused_where_it_cannot_run():
    with pytest.raises(ConfigError, match="output_kl must be 0"):
        TrainConfig().override(["output_kl=-1"])
    # Settings combine in any order on the command line: the row-routing check waits for the whole config.
    config = TrainConfig().override(["output_kl=0.5", "router.mode=block", "report=false"])
    with pytest.raises(ConfigError, match="needs row routing"):
        train(config, Path("unused"))
