"""Per-row thresholds (METHOD.md §12, budgets that follow the attention): the rule against a brute force, its
causality row by row and through the whole model, τ's calibration spending the budget's tiles, and KV-cache decode
against re-prefill under it."""

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
from llama_surgery_jax.surgery.mask import band_tiles, causal_tiles
from llama_surgery_jax.training import calibration

RULE = dict(tile=8, window=8, sink=True)
RHO = 0.6  # above the floor of 96 tokens in tiles of 8 (sink, window and own tiles: 0.42)


def brute_force_first_rows(scores: np.ndarray, tau: np.ndarray, t: int, tile: int, forced: np.ndarray) -> np.ndarray:
    """Loop form of the rule: tile (m, j) runs from the first real row of block m scoring j ≥ τ of its head."""
    b, h, _, n = scores.shape
    first = np.full((b, h, n, n), tile, np.int32)
    for s in range(b):
        for head in range(h):
            for m in range(n):
                for j in range(m + 1):
                    if forced[m, j]:
                        first[s, head, m, j] = 0
                        continue
                    for r in range(tile):
                        if m * tile + r < t and scores[s, head, m * tile + r, j] >= tau[head]:
                            first[s, head, m, j] = r
                            break
    return first


@pytest.mark.parametrize("t", [96, 91])
def test_threshold_rule_against_brute_force(t):
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    n = -(-t // RULE["tile"])
    scores = rng.random((2, 3, t, n)).astype(np.float32)
    tau = np.asarray([0.5, 0.9, 0.99], np.float32)
    got = np.asarray(br.select_rows_above(jnp.asarray(scores), jnp.asarray(tau), t=t, **RULE))
    forced = np.asarray(band_tiles(n, **RULE))
    want = brute_force_first_rows(scores, tau, t, RULE["tile"], forced)
    np.testing.assert_array_equal(got, want, err_msg=f"seed {seed}")
    assert np.all(got[:, :, ~np.asarray(causal_tiles(n, n))] == RULE["tile"]), f"seed {seed}: a non-causal tile ran"


def test_threshold_rule_is_causal_row_by_row():
    """Row i's visible key blocks depend on the scores of rows ≤ i only."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    t, n = 96, 12
    scores = jnp.asarray(rng.random((1, 2, t, n)), jnp.float32)
    tau = jnp.asarray([0.7, 0.95], jnp.float32)
    select = lambda s: br.row_visible(br.select_rows_above(s, tau, t=t, **RULE), t, RULE["tile"])  # noqa: E731
    before = np.asarray(select(scores))
    for i in (5, 43, 70):
        changed = scores.at[:, :, i + 1:].set(jnp.asarray(rng.random((1, 2, t - i - 1, n)), jnp.float32))
        np.testing.assert_array_equal(before[:, :, :i + 1], np.asarray(select(changed))[:, :, :i + 1],
                                      err_msg=f"seed {seed}, row {i}")


@pytest.mark.parametrize("per_head", [True, False])
def test_calibrated_thresholds_spend_the_budget(per_head):
    """τ from pooled peaks: the pooled sequences execute s · extra candidates per head (per layer: in all); each
    sequence at its own τ executes exactly extra. Continuous random scores: no ties."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    s, t, n = 4, 96, 12
    scores = jnp.asarray(rng.random((s, 3, t, n)), jnp.float32)
    extra = jnp.asarray([5, 17, 30], jnp.int32)
    if not per_head:  # a layer (or head) whose budget is at the floor runs no candidate
        nothing = br.threshold_tiles(br.row_peaks(scores, t=t, **RULE), jnp.zeros(3, jnp.int32), per_head=False)
        assert not np.any(np.asarray(br.select_rows_above(scores, nothing, t=t, **RULE))[:, :, candidate_mask(n)]
                          < RULE["tile"]), f"seed {seed}"
    peaks = br.row_peaks(scores, t=t, **RULE)
    tau = br.threshold_tiles(peaks, extra, per_head=per_head)
    ran = np.asarray(br.select_rows_above(scores, tau, t=t, **RULE) < RULE["tile"])
    candidate = np.asarray(br.candidate_tiles(n, **RULE))
    executed = ran[:, :, candidate].sum(axis=(0, 2))  # [h], pooled
    if per_head:
        np.testing.assert_array_equal(executed, s * np.asarray(extra), err_msg=f"seed {seed}")
    else:
        assert executed.sum() == s * int(extra.sum()), f"seed {seed}"
    own = br.per_sequence_thresholds(peaks, extra, per_head=per_head)
    ran = np.asarray(br.select_rows_above(scores, own, t=t, **RULE) < RULE["tile"])[:, :, candidate].sum(-1)
    if per_head:
        np.testing.assert_array_equal(ran, np.broadcast_to(np.asarray(extra), ran.shape), err_msg=f"seed {seed}")
    else:
        np.testing.assert_array_equal(ran.sum(-1), np.full(s, int(extra.sum())), err_msg=f"seed {seed}")


def candidate_mask(n: int) -> np.ndarray:
    return np.asarray(br.candidate_tiles(n, **RULE))


def calibrated(model, seed: int, selection: str, t: int = 96) -> np.ndarray:
    """τ [layers, heads] calibrated on 2 random sequences (other tokens than the ones a test then scores)."""
    tokens = np.asarray(jax.random.randint(jax.random.key(seed + 99), (2, t), 0, TINY.vocab_size))
    table = np.full((TINY.num_hidden_layers, TINY.num_key_value_heads), RHO, np.float32)
    return calibration.row_thresholds(model, tokens, selection=selection, densities=table, scope="layer",
                                      batch_size=2)


# Router variants beside the default, together: its scores as shares of the earlier blocks' mass, and key blocks
# from the max of their tokens' backbone outputs (each option's code path runs; one model keeps the suite short).
VARIANTS = [{}, {"row_share_of": "earlier_blocks", "key_pool": "max_hidden"}]


@pytest.mark.parametrize(("selection", "variant"), [("router", v) for v in VARIANTS]
                         + [("row_bound", {}), ("row_oracle", {})], ids=str)
def test_model_under_thresholds_is_causal(selection, variant):
    """Perturbing the tokens after i leaves the logits at positions ≤ i unchanged, bit for bit, with τ fixed (the
    router in each variant)."""
    seed = fresh_seed()
    model = row_model(seed, dataclasses.replace(ROWS, **variant))
    tau = jnp.asarray(calibrated(model, seed, selection))
    t, i = 120, 70
    tokens = jax.random.randint(jax.random.key(seed), (2, t), 0, TINY.vocab_size)
    changed = tokens.at[:, i + 1:].set((tokens[:, i + 1:] + 7) % TINY.vocab_size)
    run = nnx.jit(lambda m, x: m(x, train=False, selection=selection, thresholds=tau)[0])
    before, after = run(model, tokens), run(model, changed)
    np.testing.assert_array_equal(before[:, :i + 1], after[:, :i + 1], err_msg=f"seed {seed}: not causal")
    assert float(jnp.max(jnp.abs(before[:, i + 1:] - after[:, i + 1:]))) > 0, f"seed {seed}: nothing changed"


def test_calibration_spends_the_budget_on_its_own_sequences():
    """On the sequences τ was calibrated on, the first layer (whose input no mask touched) executes exactly the
    budget's tiles in all; the executed density is counted from the tiles the attention ran. The per-row oracle's
    scores: true masses, continuous, so no two peaks tie at τ (a router's shares do tie, at 1.0, in a block with one
    candidate, and a tie runs every tied tile)."""
    seed = fresh_seed()
    model = row_model(seed)
    t = 96
    tokens = np.asarray(jax.random.randint(jax.random.key(seed), (2, t), 0, TINY.vocab_size))
    table = np.full((TINY.num_hidden_layers, TINY.num_key_value_heads), RHO, np.float32)
    tau = calibration.row_thresholds(model, tokens, selection="row_oracle", densities=table, scope="layer",
                                     batch_size=2)
    aux = nnx.jit(lambda m, x: m(x, train=False, selection="row_oracle", thresholds=jnp.asarray(tau),
                                 return_codes=True)[1])(
        model, jnp.asarray(tokens))
    n = t // ROWS.block_size
    forced = band_tiles(n, tile=ROWS.block_size, window=ROWS.window, sink=True)
    budgets = br.row_budgets(jnp.asarray(table[0]), jnp.sum(forced, -1, dtype=jnp.int32))
    want = 2 * int(jnp.sum(budgets))
    assert int(np.sum(np.asarray(aux[0]["tiles"]))) == want, f"seed {seed}"
    density = float(np.mean(aux[0]["block_density"]))
    assert density == pytest.approx(want / (2 * TINY.num_key_value_heads * n * (n + 1) / 2), abs=1e-6)


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_threshold_decode_equals_re_prefill(variant):
    """Greedy tokens from KV-cache decode under per-row thresholds (each new row adds the candidates its predicted
    mass reaches τ on, `route_own_row`) equal those of a full re-prefill with the same τ, on a ragged batch whose
    prompts end inside a block, for more steps than a block holds; the router in each variant."""
    from llama_surgery_jax.evaluation.niah import Reprefill
    from llama_surgery_jax.inference.cache import Decoder
    from llama_surgery_jax.inference.generate import generate
    from llama_surgery_jax.training.budget import Budget

    seed = fresh_seed()
    model = row_model(seed, dataclasses.replace(ROWS, **variant))
    tau = calibrated(model, seed, "router")
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, TINY.vocab_size, size).tolist() for size in (45, 30, 61)]
    kwargs = dict(max_new_tokens=40, model_context=TINY.max_position_embeddings)
    budget = Budget(RHO, "uniform", RHO, tau)
    decoded = generate(Decoder(model, block_budget=budget), prompts, **kwargs).tokens
    again = generate(Reprefill(model, train=False, thresholds=jnp.asarray(tau)), prompts, **kwargs).tokens
    assert decoded == again, f"seed {seed}"


def test_thresholds_need_a_row_selection():
    seed = fresh_seed()
    model = row_model(seed)
    tau = jnp.zeros((TINY.num_hidden_layers, TINY.num_key_value_heads))
    tokens = jax.random.randint(jax.random.key(seed), (1, 32), 0, TINY.vocab_size)
    with pytest.raises(ValueError, match="per-row thresholds rank rows"):
        model(tokens, train=False, selection="recent", thresholds=tau)
