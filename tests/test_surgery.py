"""The surgery end to end: exactly the base model at step 0, router gradients, the chunked oracle, memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import BF16_U, attention_order_bound, float32_bound
from flax import nnx

from llama_surgery_jax.model.config import ModelConfig, Precision
from llama_surgery_jax.model.llama import LlamaForCausalLM
from llama_surgery_jax.surgery.config import RouterConfig, RouterExecution
from llama_surgery_jax.surgery.mask import token_mask
from llama_surgery_jax.surgery.reference_attention import attend, masked_attention
from llama_surgery_jax.surgery.routed_attention import hard_topology, inject_routers, remove_routers, routed_layers
from llama_surgery_jax.surgery.router import RouterParam, init_router_params, route

# At the homotopy init with one query chunk (query_chunk >= t), routed attention performs dense_attention's
# arithmetic op for op (routed_attention's docstring), so those logits are compared bit for bit, as are the
# dense model's before and after remove_routers (the same function compiled the same way).
#
# Chunking changes the row count of the P·V matmul, and XLA's CPU dot may then sum in another order: the
# softmax normaliser and P·V over the t keys, 2 sums per layer (conftest.attention_order_bound).


def chunked_bound(config: ModelConfig, t: int) -> float:
    return attention_order_bound(t, config.hidden_size, config.num_hidden_layers)


def tiny_model(precision: Precision | None = None):
    return LlamaForCausalLM(ModelConfig.named("tiny"), precision=precision or Precision(), rngs=nnx.Rngs(0))


def forward(model, tokens, **attention_kwargs):
    """The whole model under one jit, as evaluation and training run it."""
    graphdef, state = nnx.split(model)
    run = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens, **attention_kwargs))
    return run(state, tokens)


def relative_error(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.mark.parametrize("routing_heads", ["query", "kv"])
def test_step_zero_is_the_base_model_tiny(routing_heads):
    model = tiny_model()
    tokens = jax.random.randint(jax.random.key(1), (2, 96), 0, model.config.vocab_size)
    dense, _ = forward(model, tokens)
    inject_routers(model, RouterConfig(routing_heads=routing_heads, block_size=32), nnx.Rngs(1),
                   execution=RouterExecution(query_chunk=96))
    for kwargs in ({}, {"train": True, "hard": True}, {"train": True, "tau": 0.3}):
        logits, aux = forward(model, tokens, **kwargs)
        np.testing.assert_array_equal(logits, dense, err_msg=str(kwargs))
        assert all(float(a["token_density"]) == 1.0 and float(a["block_density"]) == 1.0 for a in aux)
    layers = routed_layers(model)
    object.__setattr__(layers[0], "execution", RouterExecution(query_chunk=40))
    object.__setattr__(layers[1], "execution", RouterExecution(query_chunk=40))
    chunked, _ = forward(model, tokens, train=True)
    bound = chunked_bound(model.config, tokens.shape[1])  # 96 terms, 2 layers: 1.2e-5
    assert relative_error(chunked, dense) <= bound, (relative_error(chunked, dense), bound)
    remove_routers(model)
    np.testing.assert_array_equal(forward(model, tokens)[0], dense)


@pytest.mark.slow
def test_step_zero_is_the_base_model_smollm2(smollm2_dir):
    """The tiny model's step-zero checks on real weights: SmolLM2's first 4 layers (of 30; every layer runs the same
    code, and the programs unroll over the layers, so 4 compile in about 4/30 of the time)."""
    from conftest import first_layers

    from llama_surgery_jax.model.checkpoint import load_model

    model = first_layers(load_model(smollm2_dir), 4)
    tokens = jax.random.randint(jax.random.key(0), (1, 256), 0, model.config.vocab_size)
    dense, _ = forward(model, tokens)
    inject_routers(model, RouterConfig(), nnx.Rngs(0), execution=RouterExecution(query_chunk=256))
    logits, aux = forward(model, tokens, train=True)
    np.testing.assert_array_equal(logits, dense)
    assert len(aux) == model.config.num_hidden_layers
    for layer in routed_layers(model):
        object.__setattr__(layer, "execution", RouterExecution(query_chunk=64))
    chunked, aux = forward(model, tokens)
    assert all(float(a["token_density"]) == 1.0 for a in aux), "the homotopy init must be dense"
    # 576 terms (hidden; t = 256), 4 layers: 4.0e-5 (measured 6.6e-7 to 8.5e-7 over three token draws; 2.6e-6 and
    # 3.1e-6 on two CPUs with all 30 layers, whose bound is 1.1e-4).
    bound = chunked_bound(model.config, tokens.shape[1])
    assert relative_error(chunked, dense) <= bound, (relative_error(chunked, dense), bound)


def lm_loss(model, tokens, **attention_kwargs):
    logits, aux = model(tokens, **attention_kwargs)
    log_probs = jax.nn.log_softmax(logits[:, :-1])
    ce = -jnp.mean(jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1))
    return ce + 0.1 * sum(a["load_balance_loss"] for a in aux)


@pytest.mark.parametrize("homotopy", [True, False])
def test_router_gradients_through_the_lm_loss(homotopy):
    model = inject_routers(tiny_model(), RouterConfig(p=3, levels=4, d_max=2, window=4, block_size=16),
                           nnx.Rngs(2), homotopy=homotopy, execution=RouterExecution(query_chunk=16))
    tokens = jax.random.randint(jax.random.key(3), (2, 40), 0, model.config.vocab_size)
    grad_fn = nnx.jit(nnx.grad(lambda m: lm_loss(m, tokens, train=True, tau=0.7, rng=jax.random.key(4)),
                               argnums=nnx.DiffState(0, RouterParam)))
    grads = grad_fn(model)
    leaves = jax.tree.leaves_with_path(grads)
    assert len(leaves) == 4 * model.config.num_hidden_layers  # router parameters only, never the base
    for path, g in leaves:
        name = jax.tree_util.keystr(path)
        assert np.all(np.isfinite(g)), name
        # At the homotopy init the route head is 0, so nothing reaches the backbone through it yet.
        if homotopy and "backbone" in name:
            assert not np.any(g), name
        else:
            assert np.any(g != 0), name


def test_masked_attention_matches_the_unchunked_oracle_and_its_gradients():
    config = RouterConfig(p=2, levels=4, d_max=2, window=3)
    b, t, heads, kv, d = 2, 29, 4, 2, 8
    q, k, v = (jax.random.normal(jax.random.key(i), (b, t, n, d)) for i, n in ((0, heads), (1, kv), (2, kv)))
    params = init_router_params(jax.random.key(3), 12, heads, config, homotopy=False)
    x = jax.random.normal(jax.random.key(4), (b, t, 12))

    def routed(params, q, k, v, chunk):
        routing = route(params, x, config=config, routing_heads=heads, tau=0.5, rng=jax.random.key(5))
        return masked_attention(q, k, v, routing.codes, routing.routes, config=config,
                                execution=RouterExecution(query_chunk=chunk))

    out, visible = jax.jit(routed, static_argnums=4)(params, q, k, v, 8)
    codes = route(params, x, config=config, routing_heads=heads, tau=0.5, rng=jax.random.key(5)).codes
    positions = jnp.arange(t)
    mask = token_mask(codes, codes, positions, positions, window=3, sink=True)
    assert 0.2 < float(visible) / (b * heads * t * (t + 1) / 2) < 0.9  # a real, partial mask
    # Chunks of 8 rows against one whole-sequence attend: the softmax sum and P·V over ≤ 29 keys may reorder.
    error, forward_bound = relative_error(out, attend(q, k, v, mask)), float32_bound(t, depth=2)  # 4.5e-6
    assert error <= forward_bound, error

    def loss(params, q, k, v, chunk):
        return jnp.sum(jnp.sin(routed(params, q, k, v, chunk)[0]))

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)), static_argnums=4)
    chunked, whole = grads(params, q, k, v, 8), grads(params, q, k, v, t)
    # Same math, different matmul shapes: float32 reassociation only, along the backward chain of sums over
    # ≤ 29 keys: scores, softmax sum, P·V, the row term Σ dO·O, dS·K (or dSᵀ·Q, Pᵀ·dO), the route gradient's
    # sum over keys: depth 6, 7.9e-6 of each gradient's largest element (measured ≤ 2.6e-7).
    backward_bound = float32_bound(t, depth=6)
    for (path, a), e in zip(jax.tree.leaves_with_path(chunked), jax.tree.leaves(whole), strict=True):
        assert relative_error(a, e) <= backward_bound, (jax.tree_util.keystr(path), relative_error(a, e))
    assert np.any(chunked[0]["route_weight"] != 0)


def test_kv_routing_shares_one_mask_per_gqa_group():
    model = inject_routers(tiny_model(), RouterConfig(routing_heads="kv", p=2, levels=4, d_max=1,
                                                      window=2, block_size=16), nnx.Rngs(0), homotopy=False)
    tokens = jax.random.randint(jax.random.key(1), (1, 48), 0, model.config.vocab_size)
    topology = hard_topology(model, tokens, tile=16)
    assert len(topology) == model.config.num_hidden_layers
    for layer in topology:
        assert layer.codes.shape == (1, model.config.num_key_value_heads, 48)
        assert layer.tile_mask.shape == (1, model.config.num_key_value_heads, 3, 3)
    _, aux = forward(model, tokens, return_codes=True)
    np.testing.assert_array_equal(aux[0]["codes"], topology[0].codes)
    assert float(aux[0]["token_density"]) < 1.0


def test_fp16_surgery_stays_finite_where_naive_scores_overflow():
    model = tiny_model(Precision("float16", "float16"))
    for layer in model.model.layers:  # scores of ~1e5 and more: beyond fp16 unless accumulated in float32
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
            proj.weight[...] = proj.weight[...] * 600
    inject_routers(model, RouterConfig(p=2, levels=4, d_max=2, window=8, block_size=16),
                   nnx.Rngs(0), homotopy=False, execution=RouterExecution(query_chunk=16))
    tokens = jax.random.randint(jax.random.key(1), (1, 32), 0, model.config.vocab_size)
    first = model.model.layers[0]
    x = first.input_layernorm(model.model.embed_tokens(tokens))
    q, k = first.self_attn.q_proj(x), first.self_attn.k_proj(x)  # fp16, [1, 32, heads · head_dim]
    naive_scores = jnp.einsum("btd,bsd->bts", q[..., :16], k[..., :16])  # head 0 against KV head 0
    assert not np.all(np.isfinite(naive_scores))
    logits, _ = forward(model, tokens, train=True, tau=0.1, rng=jax.random.key(2))
    assert np.all(np.isfinite(logits))
    grads = nnx.jit(nnx.grad(lambda m: lm_loss(m, tokens, train=True, tau=0.1, rng=jax.random.key(2)),
                             argnums=nnx.DiffState(0, RouterParam)))(model)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_chunked_attention_memory_is_bounded_at_8k():
    """Scratch of the compiled backward grows linearly with tokens (O(chunk · N)), not quadratically."""
    config = RouterConfig(p=2, levels=13, d_max=6)
    heads, d = 2, 16

    def backward_scratch(t):
        q = jax.ShapeDtypeStruct((1, t, heads, d), jnp.float32)
        kv = jax.ShapeDtypeStruct((1, t, 1, d), jnp.float32)
        routes = jax.ShapeDtypeStruct((1, heads, t, config.levels, config.p), jnp.float32)

        def loss(q, k, v, routes):
            codes = jnp.zeros((1, heads, t), jnp.int32)
            return jnp.sum(masked_attention(q, k, v, codes, routes, config=config)[0])

        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(q, kv, kv, routes).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    small, large = backward_scratch(2048), backward_scratch(8192)
    # 4× the tokens: scratch O(chunk · N) grows 4×, O(N²) 16×; 4.5 leaves room for buffers of fixed size.
    assert large / small < 4.5, f"{small / 2**20:.0f} → {large / 2**20:.0f} MiB for 4× the tokens"
    # Unchunked, the soft mask alone would hold heads · levels float32 N × N arrays.
    assert large < heads * config.levels * 8192**2 * 4 / 8


def test_the_kernel_runs_the_mask_that_trains():
    """METHOD.md §8.1: the block-sparse kernel's mask is the training mask, bit for bit: the tiles it is
    given hold every visible pair, and inside them the kernel's rule is the training rule."""
    from llama_surgery_jax.surgery.mask import tile_mask, tiled_token_mask
    from pallas_kernels import block_sparse_attention

    window, tile, t, heads, kv = 5, 16, 80, 4, 2
    config = RouterConfig(p=2, levels=4, d_max=2, window=window)
    params = init_router_params(jax.random.key(0), 12, heads, config, homotopy=False)
    codes = route(params, jax.random.normal(jax.random.key(1), (1, t, 12)), config=config,
                  routing_heads=heads, rng=jax.random.key(2)).codes
    tiles = tile_mask(codes, tile=tile, window=window, sink=True)
    positions = jnp.arange(t)
    ours = token_mask(codes, codes, positions, positions, window=window, sink=True)
    np.testing.assert_array_equal(tiled_token_mask(tiles, t, tile, codes=codes, window=window, sink=True), ours)
    assert 0.1 < float(jnp.mean(ours[..., jnp.tril(jnp.ones((t, t), bool))])) < 0.9

    q, k, v = (jax.random.normal(jax.random.key(i), (1, t, n, 64), jnp.bfloat16)
               for i, n in ((3, heads), (4, kv), (5, kv)))
    trained, _ = masked_attention(q, k, v, codes, config=config, execution=RouterExecution(query_chunk=32))
    executed = block_sparse_attention(q, k, v, tiles, tile=tile, codes=codes, window=window, sink=True,
                                              interpret=True)
    # Both round P to bf16 before P·V (float32 accumulation) and round O to bf16. Their float32 values differ by
    # reassociation (online vs one softmax), far below a bf16 step (where it flips the rounding of one P, O moves
    # by a fraction of a step), so each output rounds to the same or an adjacent bf16 value: one ulp, 2u = 2^-7
    # of the element; atol the same of O's unit scale, for elements near 0.
    np.testing.assert_allclose(np.asarray(executed, np.float32), np.asarray(trained, np.float32),
                               rtol=2 * BF16_U, atol=2 * BF16_U)
