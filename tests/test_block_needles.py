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


def test_router_needles_by_kv_cache_answer_as_re_prefill_does(tiny_model_dir, prose_dir, monkeypatch):
    """Two ρ and two lengths: every case answers as a re-prefill under its ρ's table, and the whole needle table
    runs one prefill shape through one compiled program (every length padded to the longest, one decoder whose
    programs take ρ as an argument)."""
    from llama_surgery_jax.inference.cache import Decoder

    seed = fresh_seed()
    tokenizer = load_tokenizer(tiny_model_dir)
    filler = corpora.tokenize(tokenizer, corpora.load_text("valid", prose_dir, "tokens")[:50_000])
    model = inject_routers(load_model(tiny_model_dir), ROWS, nnx.Rngs(seed))
    context = model.config.max_position_embeddings
    assert [s[1] for s in bq.niah_settings([0.4], oracle_density=0.4, budget="uniform")] == ["router", "oracle"]
    settings = bq.niah_settings([0.4, 0.7], oracle_density=0, budget="uniform")  # the oracle: test_block_prefill
    prefills, prefill = [], Decoder.prefill
    monkeypatch.setattr(Decoder, "prefill", lambda self, tokens, lengths, max_len: (
        prefills.append((self._prefill, tokens.shape, max_len)), prefill(self, tokens, lengths, max_len))[1])
    kwargs = dict(lengths=[80, 112], depths=[0.0, 1.0], trials=2, model_context=context)
    rows = bq.niah_rows(model, ROWS, None, tokenizer, filler, settings=settings, **kwargs)
    assert list(rows) == ["surgery (uniform) ρ=0.4", "surgery (uniform) ρ=0.7"]
    assert len(prefills) == 2 and len(set(prefills)) == 1, prefills  # 8 cases per ρ: one batch of 8 each
    assert prefills[0][1][1] == 112
    for rho in (0.4, 0.7):
        table = np.full((model.config.num_hidden_layers, model.config.num_key_value_heads), rho, np.float32)
        again = run_niah(Reprefill(model, train=False, rng=None, selection="router", block_density=table),
                         tokenizer, filler, **kwargs)
        for cached, reprefilled in zip(rows[f"surgery (uniform) ρ={rho}"], again, strict=True):
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


def test_needles_of_several_lengths_answer_alike_in_one_shape_or_one_per_length(tiny_model_dir, prose_dir):
    """Padding every length to the longest (one compiled shape) changes no answer: the padding is causal."""
    from llama_surgery_jax.inference.cache import Decoder

    tokenizer = load_tokenizer(tiny_model_dir)
    filler = corpora.tokenize(tokenizer, corpora.load_text("valid", prose_dir, "tokens")[:50_000])
    model = load_model(tiny_model_dir)
    decoder = Decoder(model, attention="reference")
    kwargs = dict(lengths=[80, 112], depths=[0.0, 1.0], trials=2, batch_size=3,
                  model_context=model.config.max_position_embeddings)
    padded = run_niah(decoder, tokenizer, filler, one_shape=True, **kwargs)
    apart = run_niah(decoder, tokenizer, filler, one_shape=False, **kwargs)
    assert [(r["length"], r["depth"], r["cases"]) for r in padded] == [(80, 0.0, 2), (80, 1.0, 2), (112, 0.0, 2),
                                                                         (112, 1.0, 2)]
    assert [r["completions"] for r in padded] == [r["completions"] for r in apart]
