"""The needle rows of a block-mode run (`block_quality.niah_rows`): the router's run by KV-cache decode and answer
as a re-prefill of every step does (decode ≡ re-prefill), under the budget asked."""

from __future__ import annotations

import numpy as np
from conftest import fresh_seed
from flax import nnx
from test_row_routing import ROWS

from llama_surgery_jax.evaluation import block_quality as bq
from llama_surgery_jax.evaluation.niah import Reprefill, run_niah
from llama_surgery_jax.io import corpora
from llama_surgery_jax.model.checkpoint import load_model, load_tokenizer
from llama_surgery_jax.surgery.routed_attention import inject_routers


def test_router_needles_by_kv_cache_answer_as_re_prefill_does(tiny_model_dir, prose_dir):
    seed = fresh_seed()
    tokenizer = load_tokenizer(tiny_model_dir)
    filler = corpora.tokenize(tokenizer, corpora.load_text("valid", prose_dir, "tokens")[:50_000])
    model = inject_routers(load_model(tiny_model_dir), ROWS, nnx.Rngs(seed))
    context = model.config.max_position_embeddings
    assert [s[1] for s in bq.niah_settings([0.4], oracle_density=0.4, budget="uniform")] == ["router", "oracle"]
    settings = bq.niah_settings([0.4], oracle_density=0, budget="uniform")  # the oracle: Reprefill (test_block_prefill)
    rows = bq.niah_rows(model, ROWS, None, tokenizer, filler, lengths=[96], depths=[0.0, 1.0], trials=2,
                        settings=settings, model_context=context)
    assert list(rows) == ["surgery (uniform) ρ=0.4"]
    table = np.full((model.config.num_hidden_layers, model.config.num_key_value_heads), 0.4, np.float32)
    again = run_niah(Reprefill(model, train=False, rng=None, selection="router", block_density=table), tokenizer,
                     filler, lengths=[96], depths=[0.0, 1.0], trials=2, model_context=context)
    for cached, reprefilled in zip(rows["surgery (uniform) ρ=0.4"], again, strict=True):
        assert cached["cases"] == 2 and cached["completions"] == reprefilled["completions"], f"seed {seed}"


def test_a_short_last_batch_is_filled_and_its_copies_dropped(tiny_model_dir, prose_dir):
    """6 cases in batches of 4: the last batch runs 2 cases and 2 copies; every case is scored once, each as in
    one batch of 6 (one batch shape per length: one compiled prefill and decode)."""
    from llama_surgery_jax.inference.cache import Decoder

    tokenizer = load_tokenizer(tiny_model_dir)
    filler = corpora.tokenize(tokenizer, corpora.load_text("valid", prose_dir, "tokens")[:50_000])
    model = load_model(tiny_model_dir)
    decoder = Decoder(model, attention="reference")
    kwargs = dict(lengths=[112], depths=[0.0, 0.5, 1.0], trials=2, model_context=model.config.max_position_embeddings)
    batched = run_niah(decoder, tokenizer, filler, batch_size=4, **kwargs)
    whole = run_niah(decoder, tokenizer, filler, batch_size=6, **kwargs)
    assert [r["cases"] for r in batched] == [2, 2, 2]
    assert [r["completions"] for r in batched] == [r["completions"] for r in whole]
