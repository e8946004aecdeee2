"""Row routing with a prefix union (METHOD.md §12): the union rule against a brute-force reference, its budget
and causality, the in-tile first rows in the reference attention, the whole model's causality, the router's
gradients, and the per-row oracle and MoBA rows."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import float32_bound, fresh_seed
from flax import nnx

from llama_surgery_jax.model.config import ConfigError, ModelConfig
from llama_surgery_jax.model.llama import LlamaForCausalLM
from llama_surgery_jax.surgery import block_routing as br
from llama_surgery_jax.surgery.config import RouterConfig
from llama_surgery_jax.surgery.mask import band_tiles, causal_tiles
from llama_surgery_jax.surgery.reference_attention import tile_masked_attention
from llama_surgery_jax.surgery.routed_attention import inject_routers
from llama_surgery_jax.surgery.router import RouterParam

TINY = ModelConfig.named("tiny")
ROWS = RouterConfig(mode="block", query="row", trees=3, d_max=0, levels=4, window=8, block_size=8,
                    routing_heads="kv", block_density=0.4, row_front=0.5)


def brute_force_first_rows(scores: np.ndarray, budgets: np.ndarray, t: int, tile: int, forced: np.ndarray,
                           front: float) -> np.ndarray:
    """The union rule in plain Python: row r of a block adds its best candidates (score desc, key block desc) not
    yet in the union until the union holds ⌈extra · (front + (1 − front)(r + 1)/T)⌉."""
    b, h, _, n = scores.shape
    first = np.full((b, h, n, n), tile, np.int32)
    for i in range(b):
        for j in range(h):
            for qb in range(n):
                first[i, j, qb][forced[qb]] = 0
                candidates = [m for m in range(qb + 1) if not forced[qb, m]]
                extra = min(max(budgets[j, qb] - forced[qb].sum(), 0), len(candidates))
                chosen: list[int] = []
                for r in range(tile):
                    if qb * tile + r >= t:
                        break
                    quota = min(math.ceil(np.float32(extra) * np.float32(front + (1 - front) * (r + 1) / tile)),
                                extra)
                    left = [m for m in candidates if m not in chosen]
                    left.sort(key=lambda m: (-scores[i, j, qb * tile + r, m], -m))
                    for m in left[:max(quota - len(chosen), 0)]:
                        chosen.append(m)
                        first[i, j, qb, m] = r
    return first


@pytest.mark.parametrize("t,tile,window,front", [(100, 8, 8, 0.5), (64, 16, 0, 0.0), (37, 4, 6, 1.0),
                                                 (90, 8, None, 0.25)])
def test_union_follows_the_rule_and_spends_the_budget_exactly(t, tile, window, front):
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    n = -(-t // tile)
    # Integer scores: ties are common, so the tie-break is exercised.
    scores = rng.integers(0, 4, size=(2, 3, t, n)).astype(np.float32)
    forced = np.asarray(band_tiles(n, tile=tile, window=window, sink=True))
    budgets = br.row_budgets(jnp.asarray([0.2, 0.5, 0.8]), jnp.sum(jnp.asarray(forced), -1, dtype=jnp.int32))
    first = np.asarray(br.select_rows(jnp.asarray(scores), budgets, t=t, tile=tile, window=window, sink=True,
                                      front=front))
    want = brute_force_first_rows(scores, np.asarray(budgets), t, tile, forced, front)
    np.testing.assert_array_equal(first, want, err_msg=f"seed {seed}")
    # The union of a full block is its budget (capped by its candidates): the executed density is ρ's rule.
    tiles = first < tile
    candidates = np.sum(np.asarray(causal_tiles(n, n)) & ~forced, -1)
    spent = np.sum(tiles, -1)
    expected = np.minimum(np.maximum(np.asarray(budgets), forced.sum(-1)), forced.sum(-1) + candidates)
    full = (np.arange(n) + 1) * tile <= t
    np.testing.assert_array_equal(spent[..., full], np.broadcast_to(expected, spent.shape)[..., full],
                                  err_msg=f"seed {seed}")


def test_union_is_causal_row_by_row():
    """Row i's visible key blocks depend on the scores of rows ≤ i only."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    t, tile, n = 96, 8, 12
    scores = jnp.asarray(rng.normal(size=(1, 2, t, n)).astype(np.float32))
    forced = band_tiles(n, tile=tile, window=8, sink=True)
    budgets = br.row_budgets(jnp.asarray([0.3, 0.6]), jnp.sum(forced, -1, dtype=jnp.int32))
    select = lambda s: br.row_visible(br.select_rows(s, budgets, t=t, tile=tile, window=8, sink=True,  # noqa: E731
                                                     front=0.3), t, tile)
    before = np.asarray(select(scores))
    for i in (5, 43, 70):
        changed = scores.at[:, :, i + 1:].set(jnp.asarray(rng.normal(size=(1, 2, t - i - 1, n)), jnp.float32))
        after = np.asarray(select(changed))
        np.testing.assert_array_equal(before[:, :, :i + 1], after[:, :, :i + 1], err_msg=f"seed {seed}, row {i}")


def random_first_rows(seed: int, t: int, tile: int, heads: int, kv: int, d: int):
    """Random float32 q [1, t, heads, d], k, v [1, t, kv, d] and first rows [1, kv, n, n] in 0…tile (tile: not
    computed), the diagonal from row 0 so that every row sees itself."""
    rng = np.random.default_rng(seed)
    n = -(-t // tile)
    q = rng.normal(size=(1, t, heads, d)).astype(np.float32)
    k = rng.normal(size=(1, t, kv, d)).astype(np.float32)
    v = rng.normal(size=(1, t, kv, d)).astype(np.float32)
    first = rng.integers(0, tile + 1, size=(1, kv, n, n)).astype(np.int32)
    first[..., np.arange(n), np.arange(n)] = 0
    return q, k, v, first


def test_first_rows_mask_the_rows_above_them():
    """tile_masked_attention with first rows against a float64 dense attention under the token mask the rule
    defines: key j is seen by query i iff j ≤ i and tile (i // T, j // T) runs from a row ≤ i % T."""
    seed = fresh_seed()
    t, tile, heads, kv, d = 53, 8, 4, 2, 16
    q, k, v, first = random_first_rows(seed, t, tile, heads, kv, d)
    tiles = first < tile
    out = np.asarray(tile_masked_attention(*(jnp.asarray(x) for x in (q, k, v)), jnp.asarray(tiles), tile=tile,
                                           chunk=16, first_rows=jnp.asarray(first)))
    pos = np.arange(t)
    seen = first[0][:, pos // tile][:, :, pos // tile] <= (pos % tile)[None, :, None]  # [kv, t, t]
    visible = np.repeat(seen & (pos[None, :] <= pos[:, None]), heads // kv, axis=0)
    kk, vv = (np.repeat(x.astype(np.float64), heads // kv, axis=2)[0] for x in (k, v))
    s = np.where(visible, np.einsum("thd,shd->hts", q[0].astype(np.float64), kk) / math.sqrt(d), -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    expected = np.einsum("hts,shd->thd", p / p.sum(-1, keepdims=True), vv)[None]
    # float32 softmax and P·V over ≤ 53 keys against float64 (values |v| ≲ 4).
    np.testing.assert_allclose(out, expected, atol=float32_bound(t, depth=2) * np.abs(v).max(),
                               err_msg=f"seed {seed}")


def test_row_tile_pairs_count_the_pairs_computed():
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    t, tile = 45, 8
    n = -(-t // tile)
    first = rng.integers(0, tile + 1, size=(1, 1, n, n)).astype(np.int32)
    pairs = np.asarray(br.row_tile_pairs(jnp.asarray(first), t, tile))[0, 0]
    pos = np.arange(t)
    seen = (first[0, 0][pos // tile][:, pos // tile] <= (pos % tile)[:, None]) & (pos[None, :] <= pos[:, None])
    want = np.zeros((n, n), np.int64)
    rows, cols = np.meshgrid(pos // tile, pos // tile, indexing="ij")
    np.add.at(want, (rows, cols), seen.astype(np.int64))
    np.testing.assert_array_equal(pairs, want, err_msg=f"seed {seed}")


def row_model(seed: int, config: RouterConfig = ROWS) -> LlamaForCausalLM:
    model = LlamaForCausalLM(TINY, rngs=nnx.Rngs(seed))
    return inject_routers(model, config, nnx.Rngs(seed + 1))


@pytest.mark.parametrize("selection", ["router", "row_oracle", "row_moba"])
def test_row_routed_model_is_causal(selection):
    """Perturbing the tokens after i leaves the logits at positions ≤ i unchanged, bit for bit."""
    seed = fresh_seed()
    model = row_model(seed)
    t, i = 120, 70
    tokens = jax.random.randint(jax.random.key(seed), (2, t), 0, TINY.vocab_size)
    changed = tokens.at[:, i + 1:].set((tokens[:, i + 1:] + 7) % TINY.vocab_size)
    run = nnx.jit(lambda m, x: m(x, train=False, selection=selection)[0])
    before, after = run(model, tokens), run(model, changed)
    np.testing.assert_array_equal(before[:, :i + 1], after[:, :i + 1], err_msg=f"seed {seed}: not causal")
    assert float(jnp.max(jnp.abs(before[:, i + 1:] - after[:, i + 1:]))) > 0, f"seed {seed}: nothing changed"


def test_row_router_reports_what_executed():
    """The executed density is the union's (the budget's) and is counted from the first rows the attention got;
    recall is a share of the dense mass. (The per-row oracle is greedy, row by row: it need not see more mass than
    the router in all, so no order between them is asserted.)"""
    seed = fresh_seed()
    model = row_model(seed)
    t = 128
    tokens = jax.random.randint(jax.random.key(seed), (1, t), 0, TINY.vocab_size)
    run = nnx.jit(lambda m, x, s: m(x, train=False, selection=s, measure_recall=True, return_codes=True)[1],
                  static_argnums=2)
    routed, oracle = run(model, tokens, "router"), run(model, tokens, "row_oracle")
    n = t // ROWS.block_size
    forced = band_tiles(n, tile=ROWS.block_size, window=ROWS.window, sink=True)
    budgets = br.row_budgets(jnp.full((TINY.num_key_value_heads,), ROWS.block_density),
                             jnp.sum(forced, -1, dtype=jnp.int32))
    want = float(jnp.sum(budgets)) / (TINY.num_key_value_heads * n * (n + 1) / 2)
    for layer, best in zip(routed, oracle, strict=True):
        tiles = np.asarray(layer["first_rows"]) < ROWS.block_size
        assert np.array_equal(tiles, np.asarray(layer["tiles"])), f"seed {seed}"
        assert abs(float(layer["block_density"][0]) - want) < 1e-6, f"seed {seed}"
        for recall in (float(layer["attention_recall"][0]), float(best["attention_recall"][0])):
            assert 0.0 < recall <= 1.0 + 1e-6, f"seed {seed}"
        assert 0.0 <= float(layer["tie_share"][0]) <= 1.0


@pytest.mark.parametrize("variant", [{}, {"row_share_of": "earlier_blocks", "key_pool": "max_hidden"}], ids=str)
def test_row_router_gradients_reach_every_parameter(variant):
    seed = fresh_seed()
    model = row_model(seed, dataclasses.replace(ROWS, **variant))
    tokens = jax.random.randint(jax.random.key(seed), (2, 96), 0, TINY.vocab_size)
    graphdef, routers, frozen = nnx.split(model, RouterParam, ...)

    def loss(routers):
        _, aux, _ = nnx.merge(graphdef, routers, frozen).hidden_states(tokens, train=True)
        return jnp.mean(jnp.stack([a["distill_loss"] for a in aux]))

    value, grads = jax.jit(jax.value_and_grad(loss))(routers)  # one program, not op by op
    assert np.isfinite(float(value)) and float(value) > 0, f"seed {seed}"
    for path, leaf in jax.tree_util.tree_leaves_with_path(grads):
        leaf = np.asarray(leaf)
        assert np.all(np.isfinite(leaf)), f"seed {seed}: non-finite gradient at {jax.tree_util.keystr(path)}"
        assert np.any(leaf != 0), f"seed {seed}: zero gradient at {jax.tree_util.keystr(path)}"


def test_row_mass_pools_to_the_tile_mass():
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    t, tile = 70, 16
    q = jnp.asarray(rng.normal(size=(1, t, 4, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, t, 2, 16)), jnp.float32)
    rows = br.row_attention_mass(q, k, tile=tile, routing_heads=2)
    np.testing.assert_allclose(np.sum(rows, -1), 1.0, atol=float32_bound(t, depth=2), err_msg=f"seed {seed}")
    np.testing.assert_allclose(br.tile_mass_of_rows(rows, tile), br.tile_attention_mass(q, k, tile=tile,
                                                                                        routing_heads=2),
                               atol=float32_bound(t, depth=3), err_msg=f"seed {seed}")


@pytest.mark.parametrize("fields,match", [({"trees": 2, "query": "block"}, "trees"), ({"trees": 0}, "trees"),
                                          ({"query": "rows"}, "query"), ({"row_front": 1.5}, "row_front")])
def test_bad_row_settings_are_refused(fields, match):
    with pytest.raises(ConfigError, match=match):
        dataclasses.replace(ROWS, **fields)


def test_row_decode_equals_re_prefill():
    """Greedy tokens from KV-cache decode (each new row extends its block's union, `route_own_row`) equal those of
    a full re-prefill with the same rule (the evaluation forward on the whole sequence each step), on a ragged
    batch whose prompts end inside a block, for more steps than a block holds: blocks open and fill in decode."""
    from llama_surgery_jax.evaluation.niah import Reprefill
    from llama_surgery_jax.inference.cache import Decoder
    from llama_surgery_jax.inference.generate import generate

    seed = fresh_seed()
    model = row_model(seed)
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, TINY.vocab_size, size).tolist() for size in (45, 30, 61)]
    kwargs = dict(max_new_tokens=40, model_context=TINY.max_position_embeddings)
    decoded = generate(Decoder(model), prompts, **kwargs).tokens
    again = generate(Reprefill(model, train=False), prompts, **kwargs).tokens
    assert decoded == again, f"seed {seed}"


def test_row_decode_keeps_the_prefill_union():
    """After a prefill of t tokens and one decode step, each layer's kept tiles are those row t of a prefill of t + 1
    tokens sees: its block's forced tiles and the union of its rows ≤ t."""
    from llama_surgery_jax.inference.cache import decode_step, prefill

    seed = fresh_seed()
    model = row_model(seed)
    t = 77
    tokens = jax.random.randint(jax.random.key(seed), (2, t + 1), 0, TINY.vocab_size)
    # Each under one jit (as the decoder and evaluation run them), not op by op.
    _, cache = nnx.jit(lambda m, x: prefill(m, x, jnp.full((2,), t), max_len=t + 8))(model, tokens[:, :t])
    _, cache, _ = nnx.jit(decode_step)(model, cache, tokens[:, t])
    _, aux = nnx.jit(lambda m, x: m(x, train=False, return_codes=True))(model, tokens)
    tile = ROWS.block_size
    for layer, kept in zip(aux, cache.layers, strict=True):
        seen = np.asarray(layer["first_rows"])[:, :, t // tile] <= t % tile  # [b, h, n]
        sel = kept.selection
        listed = np.zeros(seen.shape, bool)
        for b in range(2):
            for h in range(seen.shape[1]):
                listed[b, h, np.asarray(sel.blocks)[b, h, :int(sel.counts[b, h])]] = True
        np.testing.assert_array_equal(listed, seen, err_msg=f"seed {seed}")


def test_rows_ahead_mass_is_the_mean_over_the_rows_that_see_a_pick():
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    t, tile, n = 29, 8, 4
    mass = rng.uniform(size=(1, 2, t, n)).astype(np.float32)
    ahead = np.asarray(br.rows_ahead_mass(jnp.asarray(mass), tile))
    for i in range(t):
        end = min((i // tile + 1) * tile, t)
        # a float32 sum of ≤ 8 terms against float64
        np.testing.assert_allclose(ahead[0, :, i], mass[0, :, i:end].astype(np.float64).mean(1),
                                   rtol=float32_bound(tile), err_msg=f"seed {seed}, row {i}")


@pytest.mark.parametrize("rho", [0.15, 0.3, 0.6, 0.95])
def test_sensitivity_budget_spends_rho_above_the_floor(rho):
    """The per-layer densities of the sensitivity budget average exactly ρ (to float32), keep every layer within
    [floor, 1], and rank the layers as their sensitivities do."""
    from llama_surgery_jax.training.calibration import sensitivity_densities

    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    sensitivity = rng.exponential(size=12) * rng.integers(0, 2, 12)  # some zero: they weigh as the least positive
    floor = 0.12
    table = sensitivity_densities(sensitivity, rho, floor, heads=3)
    assert table.shape == (12, 3) and np.all(table == table[:, :1]), f"seed {seed}"
    layer = table[:, 0].astype(np.float64)
    assert abs(layer.mean() - rho) < 1e-6, f"seed {seed}: mean {layer.mean()} for ρ {rho}"
    assert np.all(layer >= floor - 1e-7) and np.all(layer <= 1.0), f"seed {seed}"
    order = np.argsort(np.maximum(sensitivity, sensitivity[sensitivity > 0].min()), kind="stable")
    assert np.all(np.diff(layer[order]) >= -1e-7), f"seed {seed}: not monotone in the sensitivity"
    below = sensitivity_densities(sensitivity, 0.05, floor, heads=3)
    assert np.all(below == np.float32(floor)), f"seed {seed}: ρ below the floor runs the floor"
