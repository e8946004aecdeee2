"""The router (METHOD.md §3–6): homotopy init, Gumbel-Softmax, tree distance, straight-through, losses."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import F32_U, float32_bound
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from llama_surgery_jax.model.config import ConfigError
from llama_surgery_jax.surgery.config import RouterConfig, RouterSchedule
from llama_surgery_jax.surgery.reference_attention import attend
from llama_surgery_jax.surgery.router import (
    init_router_params,
    lambda_at,
    load_balance_loss,
    pooled_block_features,
    prefix_codes,
    route,
    router_logits,
    sample_routes,
    soft_mask,
    straight_through,
    tau_at,
    tree_distance,
)

HIDDEN, HEADS = 16, 3
# Each example draws new shapes, so each compiles anew: 15 per run (fresh ones every run).
PROPERTY = settings(deadline=None, max_examples=15)
# A softmax over p ≤ 7 children and its VJP: a sum of p terms and ≤ 3 elementwise roundings in a row.
SOFTMAX_RTOL = float32_bound(7, depth=3)  # 2.8e-6


def random_x(key, t=24, b=2, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(key), (b, t, HIDDEN), dtype)


def one_hot_routes(choices, p):
    return jax.nn.one_hot(jnp.asarray(choices), p, dtype=jnp.float32)


def lca_height(path_a, path_b):
    """Height of the lowest common ancestor of two leaves; paths are per level, index L − 1 = root side."""
    levels = len(path_a)
    agree = 0
    for level in reversed(range(levels)):
        if path_a[level] != path_b[level]:
            break
        agree += 1
    return levels - agree


@pytest.mark.parametrize("p", [2, 3, 5, 7])
def test_homotopy_init_routes_every_token_to_child_zero(p):
    config = RouterConfig(p=p, levels=4, d_max=2)
    params = init_router_params(jax.random.key(0), HIDDEN, HEADS, config)
    routing = route(params, random_x(1), config=config, routing_heads=HEADS)
    assert routing.routes.shape == (2, HEADS, 24, 4, p)
    assert np.all(routing.codes == 0)
    np.testing.assert_array_equal(routing.routes, one_hot_routes(jnp.zeros((2, HEADS, 24, 4), int), p))
    # Collapsed routing costs p·P(child 0) with P(child 0) = 1 / (1 + (p − 1)·e^(−2b)) at bias ±b: within
    # (p − 1)·e^(−10) ≤ 2.7e-4 of p. In float32: softmaxes, then means over 144 tokens and 4 levels.
    b = config.init_bias
    expected = p / (1 + (p - 1) * np.exp(-2 * b))
    np.testing.assert_allclose(routing.load_balance_loss, expected, rtol=float32_bound(144 * 4, depth=2))


def test_noise_and_hard_options():
    config = RouterConfig(p=3, levels=4, d_max=2)
    params = init_router_params(jax.random.key(0), HIDDEN, HEADS, config, homotopy=False)
    logits = router_logits(params, random_x(2), routing_heads=HEADS, levels=4, p=3)
    routes, choices = sample_routes(logits, tau=0.5, rng=None, hard=True)
    np.testing.assert_array_equal(choices, jnp.argmax(logits, -1))
    np.testing.assert_array_equal(routes, one_hot_routes(choices, 3))  # exactly one-hot forward
    soft, _ = sample_routes(logits, tau=0.5, rng=None, hard=False)
    np.testing.assert_allclose(soft, jax.nn.softmax(logits / 0.5), rtol=SOFTMAX_RTOL)
    noisy_a, choices_a = sample_routes(logits, tau=0.5, rng=jax.random.key(3), hard=True)
    _, choices_b = sample_routes(logits, tau=0.5, rng=jax.random.key(4), hard=True)
    assert not np.array_equal(choices_a, choices_b)
    np.testing.assert_array_equal(noisy_a, one_hot_routes(choices_a, 3))


def test_straight_through_routes_pass_the_soft_gradient():
    logits = jax.random.normal(jax.random.key(0), (1, 2, 5, 3, 2))
    weights = jax.random.normal(jax.random.key(1), logits.shape)

    def through(hard):
        return lambda z: jnp.sum(weights * sample_routes(z, tau=0.7, rng=None, hard=hard)[0])

    np.testing.assert_allclose(jax.grad(through(True))(logits), jax.grad(through(False))(logits), rtol=SOFTMAX_RTOL)


@PROPERTY
@given(st.integers(2, 7).filter(lambda p: p in (2, 3, 5, 7)), st.integers(1, 6), st.data())
def test_hard_distance_is_lca_height_and_ultrametric(p, levels, data):
    paths = data.draw(st.lists(st.lists(st.integers(0, p - 1), min_size=levels, max_size=levels),
                               min_size=3, max_size=6))
    routes = one_hot_routes(paths, p)
    distance = np.asarray(tree_distance(routes, routes))
    n = len(paths)
    for i, j in itertools.product(range(n), repeat=2):
        assert distance[i, j] == lca_height(paths[i], paths[j])
    for x, y, z in itertools.product(range(n), repeat=3):
        assert distance[x, z] <= max(distance[x, y], distance[y, z])


def test_tree_distance_gradient_follows_torch_cummin_ties():
    """With one-hot routes the agreements tie; each suffix minimum's gradient goes to the level nearest
    the leaves that attains it (torch.cummin's backward, as in the preprint)."""
    query = one_hot_routes([[1, 0, 1, 0, 0]], 2)  # agreement with key, leaf → root: 0, 1, 0, 1, 1
    key = one_hot_routes([[0, 0, 0, 0, 0]], 2)
    grad = jax.grad(lambda q: jnp.sum(tree_distance(q, key)))(query)
    # Suffix minima from the root: levels 4, 3, 2 take over; 1 does not (1 > 0); 0 ties and takes over.
    np.testing.assert_array_equal(grad[0, :, 0], [-1.0, 0.0, -2.0, -1.0, -1.0])
    np.testing.assert_array_equal(grad[0, :, 1], 0.0)  # key chose child 0 everywhere


def test_tree_distance_gradient_equals_autodiff_away_from_ties():
    routes_q = jax.random.uniform(jax.random.key(0), (2, 5, 4, 3))
    routes_k = jax.random.uniform(jax.random.key(1), (2, 6, 4, 3))

    def running_min_distance(a, b):  # plain autodiff of the same function
        agreement = jnp.sum(a[:, :, None] * b[:, None], axis=-1)  # [2, t, s, l]
        return 4 - jnp.sum(jax.lax.cummin(agreement, axis=3, reverse=True), axis=-1)

    def loss(distance):
        return lambda a, b: jnp.sum(jnp.sin(distance(a, b)))

    # Distances: agreements summed over 3 children and 4 levels (12 terms) of a scale of 4 levels.
    np.testing.assert_allclose(tree_distance(routes_q, routes_k), running_min_distance(routes_q, routes_k),
                               rtol=0, atol=4 * float32_bound(3 * 4))
    ours = jax.grad(loss(tree_distance), argnums=(0, 1))(routes_q, routes_k)
    autodiff = jax.grad(loss(running_min_distance), argnums=(0, 1))(routes_q, routes_k)
    # Gradients: float32 summation order only, sums over ≤ 6 keys × 4 levels × 3 children, about 3 deep
    # (cos·cotangent, the suffix minima's routing, the agreement's products): of the largest element.
    for a, e in zip(ours, autodiff, strict=True):
        bound = float32_bound(6 * 4 * 3, depth=3) * float(jnp.max(jnp.abs(e)))  # 8.8e-6 relative
        np.testing.assert_allclose(a, e, rtol=0, atol=bound)


@PROPERTY
@given(st.sampled_from([2, 3, 5, 7]), st.integers(1, 6), st.data())
def test_prefix_codes_equal_iff_distance_within_d_max(p, levels, data):
    d_max = data.draw(st.integers(0, levels))
    paths = data.draw(st.lists(st.lists(st.integers(0, p - 1), min_size=levels, max_size=levels),
                               min_size=2, max_size=8))
    codes = np.asarray(prefix_codes(jnp.asarray(paths), p=p, prefix_levels=levels - d_max))
    assert codes.min() >= 0 and codes.max() < p ** (levels - d_max)
    distance = np.asarray(tree_distance(one_hot_routes(paths, p), one_hot_routes(paths, p)))
    np.testing.assert_array_equal(codes[:, None] == codes[None, :], distance <= d_max)


def test_straight_through_forward_is_the_hard_mask_exactly():
    soft = jax.random.uniform(jax.random.key(0), (4, 33, 47))
    hard = jax.random.bernoulli(jax.random.key(1), 0.4, soft.shape)
    forward = straight_through(hard, soft)
    assert forward.dtype == soft.dtype
    np.testing.assert_array_equal(forward, hard.astype(jnp.float32))
    # The naive `stop_gradient(hard − soft) + soft` is only hard up to rounding; ours must be exact.
    assert jnp.all((forward == 0) | (forward == 1))


def test_straight_through_backward_is_the_soft_masks_gradient():
    config = RouterConfig(p=2, levels=5, d_max=2)
    params = init_router_params(jax.random.key(0), HIDDEN, HEADS, config, homotopy=False)
    x = random_x(3, t=12)
    cotangent_weights = jax.random.normal(jax.random.key(4), (2, HEADS, 12, 12))

    def masks(params):
        routing = route(params, x, config=config, routing_heads=HEADS, tau=0.8, rng=jax.random.key(5))
        soft = soft_mask(tree_distance(routing.routes, routing.routes), d_max=config.d_max, temperature=0.5)
        hard = routing.codes[..., :, None] == routing.codes[..., None, :]
        return hard, soft

    def loss_of_mask(m):  # nonlinear, so the gradient depends on where it is evaluated
        return jnp.sum(cotangent_weights * m**2)

    @jax.jit
    def both_gradients(params):
        hard, _ = masks(params)
        grad_ste = jax.grad(lambda params: loss_of_mask(straight_through(*masks(params))))(params)
        # Backward: the soft mask's VJP with ∂L/∂m evaluated at the forward value m = hard.
        _, soft_vjp = jax.vjp(lambda params: masks(params)[1], params)
        return grad_ste, soft_vjp(jax.grad(loss_of_mask)(hard.astype(jnp.float32)))[0]

    grad_ste, expected = both_gradients(params)
    # The same VJP of the soft mask in two places of one program, which XLA may fuse apart: sums over 12 keys,
    # 5 levels, 2 children and the 16 hidden units of the router, about 4 deep; of each gradient's largest element.
    for name in params:
        bound = float32_bound(12 * 5 * 2 * HIDDEN, depth=4) * float(jnp.max(jnp.abs(expected[name])))  # 5.2e-5
        np.testing.assert_allclose(grad_ste[name], expected[name], rtol=0, atol=bound)
    assert any(np.any(grad_ste[name] != 0) for name in params)


def test_check_grads_on_the_soft_path():
    """Finite differences agree with jax.grad on soft routes → tree distance → soft mask → attention."""
    config = RouterConfig(p=3, levels=3, d_max=1)
    params = init_router_params(jax.random.key(0), 4, 2, config, homotopy=False)
    x = jax.random.normal(jax.random.key(1), (1, 5, 4))
    q, k, v = (jax.random.normal(jax.random.key(i), (1, 5, 2, 4)) for i in (2, 3, 4))
    visible = jnp.broadcast_to(jnp.tril(jnp.ones((5, 5), bool)), (1, 2, 5, 5))

    @jax.jit
    def soft_path(route_weight, q, k, v):
        logits = router_logits({**params, "route_weight": route_weight}, x, routing_heads=2, levels=3, p=3)
        routes, _ = sample_routes(logits, tau=0.7, rng=None, hard=False)
        m = soft_mask(tree_distance(routes, routes), d_max=config.d_max, temperature=0.5)
        return attend(q, k, v, visible, m)

    # Central differences at eps = 1e-3 in float32: rounding u·|f|/eps ≈ 6e-5 of f's scale per element, √40 of
    # them added by check_grads' random cotangent over the 40 outputs, ×10 margin: 3.8e-3. Truncation eps²/6 ×
    # the third derivative (temperatures 0.7 and 0.5 scale it by ≤ 1/0.35³ ≈ 23) ≈ 4e-6.
    eps = 1e-3
    tolerance = 10 * np.sqrt(q.size) * F32_U / eps
    check_grads(soft_path, (params["route_weight"], q, k, v), order=1, modes=["rev"], eps=eps, atol=tolerance,
                rtol=tolerance)


def test_load_balance_loss_is_one_when_balanced_and_p_when_collapsed():
    p = 3
    balanced_choices = jnp.tile(jnp.arange(p), 4)[None, None, :, None]  # [1, 1, 12, 1]
    uniform = jnp.zeros((1, 1, 12, 1, p))
    # Means over 12 tokens of softmaxes over 3 children: a few float32 roundings of sums of ≤ 12 terms.
    np.testing.assert_allclose(load_balance_loss(uniform, balanced_choices), 1.0, rtol=float32_bound(12))
    collapsed = jnp.zeros((1, 1, 12, 1, p)).at[..., 0].set(100.0)
    np.testing.assert_allclose(load_balance_loss(collapsed, jnp.zeros((1, 1, 12, 1), int)), p, rtol=float32_bound(12))
    # Gradient reaches the logits only through P (f is a count).
    grad = jax.grad(lambda z: load_balance_loss(z, balanced_choices))(uniform + 0.1)
    assert np.all(np.isfinite(grad))


def test_schedules():
    # τ and λ are a few float32 operations of the step (divide, clip, cos, multiply, add): ≤ 5 roundings.
    rtol = float32_bound(1, depth=5)  # 1.3e-6
    linear = RouterSchedule(tau_start=1.0, tau_end=0.1, tau_steps=100, lambda_max=2.0, lambda_steps=50)
    np.testing.assert_allclose([tau_at(s, linear) for s in (0, 50, 100, 150)], [1.0, 0.55, 0.1, 0.1],
                               rtol=rtol)
    np.testing.assert_allclose([lambda_at(s, linear) for s in (0, 25, 50, 80)], [0.0, 1.0, 2.0, 2.0],
                               rtol=rtol)
    cosine = RouterSchedule(tau_schedule="cosine", tau_start=1.0, tau_end=0.1, tau_steps=100)
    np.testing.assert_allclose([tau_at(s, cosine) for s in (0, 50, 100, 200)], [1.0, 0.55, 0.1, 0.1],
                               rtol=rtol)
    assert tau_at(25, cosine) > tau_at(25, linear)  # cosine stays hot longer at first
    assert jnp.asarray(jax.jit(tau_at, static_argnums=1)(jnp.int32(30), cosine)).shape == ()


def test_config_validation():
    with pytest.raises(ConfigError):
        RouterConfig(p=4)
    with pytest.raises(ConfigError):
        RouterConfig(levels=5, d_max=6)
    with pytest.raises(ConfigError):
        RouterConfig(routing_heads="group")
    assert [RouterConfig.for_context(8192, p).levels for p in (2, 3, 5, 7)] == [13, 9, 6, 5]
    assert RouterConfig.for_context(8192, 2).d_max == 6 and RouterConfig.for_context(8192, 2).num_codes == 128


pooled_jit = jax.jit(pooled_block_features, static_argnums=1)


@PROPERTY
@given(st.sampled_from([1, 4, 8]), st.integers(0, 36))
def test_pooled_block_features_are_causal(block_size, token):
    x = jax.random.normal(jax.random.key(0), (1, 37, 3))
    later = jnp.where(jnp.arange(37)[None, :, None] > token, 1e3, x)
    features, perturbed = pooled_jit(x, block_size), pooled_jit(later, block_size)
    visible_blocks = token // block_size + 1  # blocks whose keys token i may see
    np.testing.assert_array_equal(features[:, :visible_blocks], perturbed[:, :visible_blocks])
    # Block 0's feature is the mean of token 0 alone: a sum with zeros and a division by 1, exact.
    np.testing.assert_array_equal(features[0, 0], x[0, 0])


def test_block_mode_shares_one_route_per_block():
    config = RouterConfig(p=2, levels=4, d_max=1, mode="block_prefix", block_size=8)
    params = init_router_params(jax.random.key(0), HIDDEN, HEADS, config, homotopy=False)
    routing = route(params, random_x(1, t=30), config=config, routing_heads=HEADS, rng=jax.random.key(2))
    codes = np.asarray(routing.codes)
    assert codes.shape == (2, HEADS, 30)
    for start in range(0, 30, 8):
        assert np.all(codes[..., start:start + 8] == codes[..., start:start + 1])


def test_fp16_routing_and_scores_stay_finite_where_the_naive_version_overflows():
    # Logits of a few thousand are within fp16 range, but divided by τ = 0.1 they are not.
    logits16 = jnp.full((1, 1, 4, 2, 2), -7000.0, jnp.float16).at[..., 0].set(7000.0)
    naive = jax.nn.softmax((logits16 + jax.random.gumbel(jax.random.key(0), logits16.shape, jnp.float16))
                           / jnp.float16(0.1), axis=-1)
    assert not np.all(np.isfinite(naive))
    routes, _ = sample_routes(logits16, tau=0.1, rng=jax.random.key(0), hard=True)
    grad = jax.grad(lambda z: jnp.sum(sample_routes(z, tau=0.1, rng=jax.random.key(0), hard=True)[0] ** 2))(
        logits16.astype(jnp.float32))
    assert np.all(np.isfinite(routes)) and np.all(np.isfinite(grad))

    # Q·K of head dim 16 with entries 100 is 1.6e5 > fp16's 65504.
    q = jnp.full((1, 6, 2, 16), 100.0, jnp.float16)
    k = jnp.full((1, 6, 1, 16), 100.0, jnp.float16)
    v = jax.random.normal(jax.random.key(1), (1, 6, 1, 16), jnp.float16)
    assert not np.all(np.isfinite(jnp.einsum("bthd,bskd->bhts", q, k)))
    visible = jnp.broadcast_to(jnp.tril(jnp.ones((6, 6), bool)), (1, 2, 6, 6))
    multiplier = straight_through(visible, jnp.full(visible.shape, 0.7))
    out = attend(q, k, v, visible, multiplier)
    grads = jax.grad(lambda q, k, m: jnp.sum(attend(q, k, v, visible, m).astype(jnp.float32)),
                     argnums=(0, 1, 2))(q, k, jnp.full(visible.shape, 0.7))
    assert out.dtype == jnp.float16 and np.all(np.isfinite(out))
    assert all(np.all(np.isfinite(g.astype(jnp.float32))) for g in grads)

    # Router backbone on fp16 activations near the top of the range: float32 accumulation.
    config = RouterConfig(p=2, levels=3, d_max=1)
    params = init_router_params(jax.random.key(2), HIDDEN, HEADS, config, homotopy=False)
    x16 = jnp.full((1, 5, HIDDEN), 3e4, jnp.float16)
    routing = route(params, x16, config=config, routing_heads=HEADS, tau=0.1, rng=jax.random.key(3))
    assert np.all(np.isfinite(routing.routes)) and np.isfinite(routing.load_balance_loss)


def test_limits_are_refused_when_the_config_is_built():
    """Codes that overflow int32, and tiles the kernels cannot take, fail at config time, not inside jit."""
    from llama_surgery_jax.model.config import ConfigError
    from llama_surgery_jax.training.config import TrainConfig

    RouterConfig(p=2, levels=36, d_max=6)  # 2^30 codes fit
    with pytest.raises(ConfigError, match="overflow int32"):
        RouterConfig(p=2, levels=36, d_max=5)  # 2^31 codes: the last, 2^31 − 1, would be the kernels' padding
    with pytest.raises(ConfigError, match="overflow int32"):
        RouterConfig(p=7, levels=20, d_max=8)
    with pytest.raises(ConfigError, match="power of two"):
        RouterConfig(block_size=48)
    with pytest.raises(ConfigError, match="block_size a power of two >= 16"):
        TrainConfig().override(["router.block_size=8", "execution.attention_backend=kernel"])
    TrainConfig().override(["router.block_size=8"])  # auto takes the reference for such tiles
