"""Needle in a haystack: case construction (exact length, needle at its depth) and the scoring loop."""

from __future__ import annotations

import numpy as np
import pytest

from llama_surgery_jax.evaluation.niah import build_case, first_number, run_niah, table
from llama_surgery_jax.inference.cache import Decoder
from llama_surgery_jax.io import corpora
from llama_surgery_jax.model.checkpoint import load_model, load_tokenizer


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, prose_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    filler = corpora.tokenize(tokenizer, corpora.load_text("valid", prose_dir, "tokens")[:100_000])
    return load_model(tiny_model_dir), tokenizer, filler


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_case_has_its_length_and_the_needle_at_its_depth(tiny, depth):
    _, tokenizer, filler = tiny
    case = build_case(tokenizer, filler, length=300, depth=depth, rng=np.random.default_rng(0))
    assert len(case.prompt) == 300 and len(case.answer) == 7
    text = tokenizer.decode(case.prompt)
    needle_at = text.index(f"is {case.answer}.") / text.index("\nQuestion:")
    # Depth is placed in tokens and measured here in characters, at the needle's "is": off by (prefix − depth ·
    # needle) / text, ≤ 40 of ≥ 600 characters (0.067, at depth 0), and by the filler's uneven characters per
    # token between its two sides (≈ 0.03 at depth 0.5). Deterministic (rng 0, a trained tokenizer): 0.045, 0.030
    # and 0.019 on the tests' prose; the worst of 200 seeds is 0.092 there (0.076 on WikiText-2 valid).
    assert abs(needle_at - depth) < 0.1, (needle_at, depth)
    assert text.endswith(" is")
    with pytest.raises(ValueError, match="no room"):
        build_case(tokenizer, filler, length=10, depth=depth, rng=np.random.default_rng(0))


def test_first_number():
    assert first_number(" 1234567. The") == "1234567"
    assert first_number(" unknown") is None


def test_run_niah_scores_every_case(tiny):
    model, tokenizer, filler = tiny
    rows = run_niah(Decoder(model, attention="reference"), tokenizer, filler, lengths=[96, 128], depths=[0.0, 1.0],
                    trials=2, model_context=model.config.max_position_embeddings)
    assert [(r["length"], r["depth"], r["cases"]) for r in rows] == [(96, 0.0, 2), (96, 1.0, 2), (128, 0.0, 2),
                                                                       (128, 1.0, 2)]
    assert all(0 <= r["accuracy"] <= 1 for r in rows)
    assert "| 128 | all |" in table({"dense": rows, "surgery": rows})


@pytest.mark.slow
def test_dense_smollm2_finds_a_needle_at_1k(smollm2_dir, wikitext_dir):
    """A case with a known answer: the dense embedded model retrieves the needle at 1k (dense SmolLM2 scored
    100 % at 2k and 4k on an H200, and at 1k and 2k on CPU), so a broken cache, prompt or scorer fails here.
    1k rather than 2k: the needle still sits ~500 tokens back, across four blocks of the 128-slot cache, and the
    prefill and decode over it take half the time."""
    tokenizer = load_tokenizer(smollm2_dir)
    filler = corpora.tokenize(tokenizer, corpora.load_text("valid", wikitext_dir, "tokens")[:100_000])
    model = load_model(smollm2_dir)
    rows = run_niah(Decoder(model, attention="reference"), tokenizer, filler, lengths=[1024], depths=[0.5],
                    trials=1, model_context=model.config.max_position_embeddings)
    assert rows[0]["accuracy"] == 1.0, rows[0]["completions"]


def test_needles_under_per_row_thresholds_decode_as_re_prefill(tiny_model_dir, tiny):
    """Needle rows whose router spends its budget by per-row thresholds (`niah_rows` with a "+thresholds" budget):
    τ is calibrated at each needle length on the training text, so it differs between lengths, and each length's
    cases decode (prefill + KV cache, padded to the longest length) under their own τ. The completions are those
    of re-prefill under the same τ per length, case by case (decode ≡ re-prefill, lengths never mixed)."""
    import jax.numpy as jnp
    from conftest import fresh_seed
    from flax import nnx
    from test_row_routing import ROWS

    from llama_surgery_jax.evaluation.block_quality import CALIBRATION_SEQUENCES, niah_rows, niah_settings
    from llama_surgery_jax.evaluation.niah import Reprefill
    from llama_surgery_jax.surgery.routed_attention import inject_routers
    from llama_surgery_jax.training import calibration

    _, tokenizer, filler = tiny
    seed = fresh_seed()
    model = load_model(tiny_model_dir)
    router = ROWS
    inject_routers(model, router, nnx.Rngs(seed))
    rho, lengths, context = 0.6, [96, 128], model.config.max_position_embeddings
    common = dict(lengths=lengths, depths=[0.0, 1.0], trials=1, model_context=context)
    rows = niah_rows(model, router, None, tokenizer, filler, settings=niah_settings([rho], 0, "uniform", True),
                     training=filler, batch_size=2, **common)
    (name, decoded), = rows.items()
    assert name == f"surgery (uniform+thresholds) ρ={rho}"

    table = np.full((model.config.num_hidden_layers, model.config.num_key_value_heads), rho, np.float32)
    tau = {n: calibration.row_thresholds(model, corpora.windows(filler, n, CALIBRATION_SEQUENCES), selection="router",
                                         densities=table, scope="layer", batch_size=2) for n in lengths}
    assert not np.array_equal(tau[96], tau[128]), f"seed {seed}: τ is calibrated per length"
    again = run_niah(None, tokenizer, filler, one_shape=False, decoder_at={
        n: Reprefill(model, train=False, rng=None, selection="router", block_density=jnp.asarray(table),
                     thresholds=jnp.asarray(tau[n])) for n in lengths}, **common)
    assert [r["completions"] for r in decoded] == [r["completions"] for r in again], f"seed {seed}"
