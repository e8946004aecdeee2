"""The Quest-style bound per row (`block_routing.row_bound_score`): against a float64 brute force, exactly causal,
and the whole model's logits causal under it."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import fresh_seed
from flax import nnx
from test_row_routing import ROWS, TINY, row_model

from llama_surgery_jax.surgery import block_routing as br

EPS32 = float(np.finfo(np.float32).eps)


def brute_force_bound_mass(q: np.ndarray, k: np.ndarray, tile: int, per_kv: bool) -> np.ndarray:
    """float64: row i's softmax over the blocks before its own of Σ_d max(q_d · min_d, q_d · max_d) / √d (the min
    and max over the block's real keys), mean over a KV head's query heads when per_kv."""
    b, t, heads, d = q.shape
    kv = k.shape[2]
    group = heads // kv
    n = -(-t // tile)
    out = np.zeros((b, heads, t, n))
    for i in range(b):
        for h in range(heads):
            for row in range(t):
                own = row // tile
                if own == 0:
                    continue
                keys = [k[i, m * tile:min((m + 1) * tile, t), h // group] for m in range(own)]
                qd = q[i, row, h]
                logits = np.array([np.sum(np.maximum(qd * blk.min(0), qd * blk.max(0))) for blk in keys]) / np.sqrt(d)
                w = np.exp(logits - logits.max())
                out[i, h, row, :own] = w / w.sum()
    if per_kv:
        return out.reshape(b, kv, group, t, n).mean(axis=2)
    return out


@pytest.mark.parametrize("t,tile,per_kv", [(37, 8, True), (32, 4, False), (9, 16, True)])
def test_bound_mass_matches_a_float64_brute_force(t, tile, per_kv):
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    b, heads, kv, d = 2, 4, 2, 16
    q = rng.standard_normal((b, t, heads, d)).astype(np.float32)
    k = rng.standard_normal((b, t, kv, d)).astype(np.float32)
    got = np.asarray(br.row_bound_score(jnp.asarray(q), jnp.asarray(k), tile=tile,
                                        routing_heads=kv if per_kv else heads))
    want = brute_force_bound_mass(q.astype(np.float64), k.astype(np.float64), tile, per_kv)
    # Each logit is a d-term float32 sum of products bounded by Σ|q||k|: absolute error ≤ d·ε·Σ|q||k|/√d. A softmax's
    # masses move by at most 2·(that error) relatively, plus its own few roundings; ×4 margin.
    logit_error = d * EPS32 * float(np.max(np.abs(q).sum(-1))) * float(np.abs(k).max()) / np.sqrt(d)
    tol = 4 * (2 * logit_error + 8 * EPS32)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=tol, err_msg=f"seed {seed}")


def test_bound_of_a_row_depends_on_no_key_of_its_own_block_or_later():
    """Row i's scores are a function of its own query and the keys before its block: changing every later key and
    query leaves them bit-identical."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    t, tile, i = 40, 8, 21
    q = jnp.asarray(rng.standard_normal((1, t, 4, 16)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, t, 2, 16)), jnp.float32)
    start = (i // tile) * tile
    k2 = k.at[:, start:].set(jnp.asarray(rng.standard_normal((1, t - start, 2, 16)), jnp.float32))
    q2 = q.at[:, i + 1:].set(jnp.asarray(rng.standard_normal((1, t - i - 1, 4, 16)), jnp.float32))
    before = br.row_bound_score(q, k, tile=tile, routing_heads=2)
    after = br.row_bound_score(q2, k2, tile=tile, routing_heads=2)
    np.testing.assert_array_equal(before[:, :, :i + 1], after[:, :, :i + 1], err_msg=f"seed {seed}")


def test_row_bound_model_is_causal():
    """Perturbing the tokens after i leaves the logits at positions ≤ i unchanged, bit for bit."""
    seed = fresh_seed()
    model = row_model(seed)
    t, i = 120, 70
    tokens = jax.random.randint(jax.random.key(seed), (2, t), 0, TINY.vocab_size)
    changed = tokens.at[:, i + 1:].set((tokens[:, i + 1:] + 7) % TINY.vocab_size)
    run = nnx.jit(lambda m, x: m(x, train=False, selection="row_bound")[0])
    before, after = run(model, tokens), run(model, changed)
    np.testing.assert_array_equal(before[:, :i + 1], after[:, :i + 1], err_msg=f"seed {seed}: not causal")
    assert float(jnp.max(jnp.abs(before[:, i + 1:] - after[:, i + 1:]))) > 0, f"seed {seed}: nothing changed"


def test_quality_table_rows_are_picked_by_selection_and_budget(capsys):
    from llama_surgery_jax.quality import main, parse_args

    args = parse_args(["--run", "RUN", "--rows", "row_bound/uniform,recent/sensitivity"])
    assert args.rows == [("quest per row", "row_bound", "uniform"),
                         ("streaming (sensitivity)", "recent", "sensitivity")]
    assert main(["--run", "RUN", "--rows", "row_bound/adaptive"]) == 2
    assert "no row 'row_bound/adaptive': the rows are router/adaptive" in capsys.readouterr().err


def test_lagged_oracle_model_is_causal():
    """The previous query block's mass ranks a block's key blocks: perturbing the tokens after i leaves the logits
    at positions ≤ i unchanged, bit for bit."""
    seed = fresh_seed()
    model = row_model(seed, dataclasses.replace(ROWS, query="block", trees=1))
    t, i = 120, 70
    tokens = jax.random.randint(jax.random.key(seed), (2, t), 0, TINY.vocab_size)
    changed = tokens.at[:, i + 1:].set((tokens[:, i + 1:] + 7) % TINY.vocab_size)
    run = nnx.jit(lambda m, x: m(x, train=False, selection="lagged_oracle")[0])
    before, after = run(model, tokens), run(model, changed)
    np.testing.assert_array_equal(before[:, :i + 1], after[:, :i + 1], err_msg=f"seed {seed}: not causal")
    assert float(jnp.max(jnp.abs(before[:, i + 1:] - after[:, i + 1:]))) > 0, f"seed {seed}: nothing changed"


def test_lagged_mass_is_the_previous_blocks_row():
    mass = jax.random.uniform(jax.random.key(fresh_seed()), (2, 3, 5, 5))
    lagged = br.lagged_mass(mass)
    np.testing.assert_array_equal(lagged[:, :, 1:], mass[:, :, :-1])
    assert not np.any(np.asarray(lagged[:, :, 0]))
