"""Inference: training-path forward (hard mask), prefill and prefill + KV-cache decode agree; generate CLI."""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import BF16_U, SUMS_PER_LAYER, TINY_LOGITS_BOUND, first_layers, float32_bound, fresh_seed
from flax import nnx

from llama_surgery_jax.generate import main
from llama_surgery_jax.inference.cache import ContextError, Decoder
from llama_surgery_jax.inference.generate import generate
from llama_surgery_jax.model.checkpoint import load_model
from llama_surgery_jax.model.config import ModelConfig
from llama_surgery_jax.model.llama import LlamaForCausalLM
from llama_surgery_jax.surgery.config import RouterConfig
from llama_surgery_jax.surgery.reference_attention import attend, gathered_attention
from llama_surgery_jax.surgery.routed_attention import inject_routers

# Three-path agreement, float32 on CPU: the paths (training forward, prefill, one token at a time) sum the same
# products in different orders, so logits differ by float32 reassociation only: conftest's whole-model bound
# (8 reorderable sums per layer, the longest over the MLP width, ×10), against the largest logit.
AGREEMENT_RTOL = TINY_LOGITS_BOUND  # 3.2e-5
# The kernel path rounds q, k, v, the probabilities and the output to bf16 (five roundings of 2^-8 at most);
# the rest of the model stays float32.
KERNEL_RTOL = 5 * BF16_U  # 2.0e-2
# Random route heads with short windows and few tree levels, so that the masks are far from dense.
SPARSE_ROUTER = RouterConfig(levels=6, d_max=3, window=8, block_size=16)


# The training forward with the hard mask: (logits, aux). One jitted function, so that a test's density check and
# its three paths share one compiled program (op by op, outside jit, the tiny model's forward takes ~4 s to dispatch).
training_path = nnx.jit(lambda m, x: m(x, train=True, hard=True, tau=1.0, rng=None))


def three_paths(model, tokens: jax.Array, prompt_len: int, *, gather: bool, budget_step: int = 8):
    """tokens: [b, t] → logits [b, t, vocab] of (training path, prefill, prefill of prompt_len + decode)."""
    b, t = tokens.shape
    train_path = training_path(model, tokens)[0]
    decoder = Decoder(model, attention="reference", gather=gather, budget_step=budget_step)
    full = jnp.full((b,), t)
    prefilled, _ = decoder.prefill(tokens, full, t)
    logits, cache = decoder.prefill(tokens[:, :prompt_len], jnp.full((b,), prompt_len), t)
    steps = [logits]
    for i in range(prompt_len, t):
        step_logits, cache = decoder.step(cache, tokens[:, i])
        steps.append(step_logits[:, None])
    return train_path, prefilled, jnp.concatenate(steps, axis=1), decoder


def assert_close(a, b, what, rtol=AGREEMENT_RTOL):
    scale = float(jnp.max(jnp.abs(a)))
    error = float(jnp.max(jnp.abs(a - b)))
    assert error <= rtol * scale, f"{what}: max |Δ| {error:.3g} > {rtol} × {scale:.3g}"


def tiny_routed(seed: int) -> LlamaForCausalLM:
    model = LlamaForCausalLM(ModelConfig.named("tiny"), rngs=nnx.Rngs(seed))
    return inject_routers(model, SPARSE_ROUTER, nnx.Rngs(seed + 1), homotopy=False)


@pytest.mark.parametrize("routing_heads", ["query", "kv"])
def test_three_paths_agree_tiny(routing_heads):
    seed = fresh_seed()
    model = LlamaForCausalLM(ModelConfig.named("tiny"), rngs=nnx.Rngs(seed))
    config = RouterConfig(**{**SPARSE_ROUTER.__dict__, "routing_heads": routing_heads})
    inject_routers(model, config, nnx.Rngs(seed + 1), homotopy=False)
    tokens = jax.random.randint(jax.random.key(seed), (2, 40), 0, 512)
    _, aux = training_path(model, tokens)  # the hard mask of the three paths
    assert max(float(a["token_density"]) for a in aux) < 0.8, f"seed {seed}: masks too dense to test"
    gather = routing_heads == "query"  # the masked decode over the whole cache is checked with KV routing
    train_path, prefilled, decoded, decoder = three_paths(model, tokens, prompt_len=24, gather=gather)
    assert_close(train_path, prefilled, f"seed {seed}: prefill vs training path")
    assert_close(train_path, decoded, f"seed {seed}: prefill + decode (gather={gather}) vs training path")
    if gather:  # each decoded row sees itself and its window of 8: a budget of 8 overflows, and the step repeats
        assert decoder.budget > 8, f"seed {seed}: the gather budget never overflowed"


def test_three_paths_agree_block_mode():
    """Block-mode routers (one route per block of 8, from the mean of the 8 router inputs ending at the block's
    first token): prompts that end inside a block, decode across block starts, and a batch of two lengths."""
    seed = fresh_seed()
    model = LlamaForCausalLM(ModelConfig.named("tiny"), rngs=nnx.Rngs(seed))
    config = dataclasses.replace(SPARSE_ROUTER, mode="block_prefix", block_size=8, routing_heads="kv")
    inject_routers(model, config, nnx.Rngs(seed + 1), homotopy=False)
    tokens = jax.random.randint(jax.random.key(seed), (2, 40), 0, 512)
    _, aux = training_path(model, tokens)  # the hard mask of the three paths
    assert max(float(a["token_density"]) for a in aux) < 0.8, f"seed {seed}: masks too dense to test"
    train_path, prefilled, decoded, decoder = three_paths(model, tokens, prompt_len=21, gather=True)
    assert_close(train_path, prefilled, f"seed {seed}: block-mode prefill vs training path")
    assert_close(train_path, decoded, f"seed {seed}: block-mode prefill + decode vs training path")

    lengths = jnp.array([21, 13])  # ragged: each sequence decodes its own continuation
    logits, cache = decoder.prefill(tokens[:, :21], lengths, 40)
    for _ in range(19):
        step_logits, cache = decoder.step(cache, tokens[jnp.arange(2), cache.lengths])
        for b in range(2):
            position = int(cache.lengths[b]) - 1
            assert_close(train_path[b, position], step_logits[b], f"seed {seed}: sequence {b} at {position}")


def test_gather_reads_only_the_budget_and_flags_overflow():
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(2, 8, 16)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, 40, 2, 16)), jnp.float32) for _ in range(2))
    visible = jnp.asarray(rng.random((2, 8, 40)) < 0.2).at[..., 0].set(True)
    most = int(jnp.max(jnp.sum(visible, -1)))
    masked = attend(q[:, None], k, v, visible[:, :, None, :])[:, 0]
    out, seen = gathered_attention(q, k, v, visible, budget=most)
    assert int(seen) == most
    np.testing.assert_allclose(out, masked, atol=AGREEMENT_RTOL * float(jnp.max(jnp.abs(masked))))
    assert int(gathered_attention(q, k, v, visible, budget=most - 1)[1]) > most - 1  # overflow is reported


def test_kernel_prefill_agrees_with_the_training_path():
    """The block-sparse kernel (interpret mode on CPU) needs head_dim 64: a tiny model with that head size.

    One layer: its routes come from the embeddings, identical on both paths. With more layers the bf16
    rounding of one layer's attention can flip a later layer's argmax route (a discrete choice, not a
    rounding error), and the comparison would no longer be of the same mask.
    """
    seed = fresh_seed()
    config = dataclasses.replace(ModelConfig.named("tiny"), hidden_size=128, num_attention_heads=2,
                                 num_key_value_heads=1, head_dim=64, num_hidden_layers=1)
    for routed in (True, False):
        model = LlamaForCausalLM(config, rngs=nnx.Rngs(seed))
        if routed:
            inject_routers(model, SPARSE_ROUTER, nnx.Rngs(seed + 1), homotopy=False)
        tokens = jax.random.randint(jax.random.key(seed), (2, 45), 0, 512)
        reference = nnx.jit(lambda m, x: m(x, train=True, hard=True, tau=1.0, rng=None)[0])(model, tokens)
        kernel, _ = Decoder(model, attention="kernel").prefill(tokens, jnp.full((2,), 45), 45)
        scale = float(jnp.max(jnp.abs(reference)))
        assert float(jnp.max(jnp.abs(kernel - reference))) <= KERNEL_RTOL * scale, f"seed {seed}, routed={routed}"


def test_dense_model_decode_matches_forward():
    seed = fresh_seed()
    model = LlamaForCausalLM(ModelConfig.named("tiny"), rngs=nnx.Rngs(seed))
    tokens = jax.random.randint(jax.random.key(seed), (1, 24), 0, 512)
    forward, prefilled, decoded, _ = three_paths(model, tokens, prompt_len=5, gather=True)
    assert_close(forward, prefilled, f"seed {seed}: dense prefill")
    assert_close(forward, decoded, f"seed {seed}: dense decode")


def test_batch_of_different_lengths_equals_one_by_one():
    model = tiny_routed(fresh_seed())
    decoder = Decoder(model, attention="reference", budget_step=8)
    prompts = [[5, 17, 300, 2, 9, 41, 7], [11, 12], [400, 3, 3, 3, 8]]
    together = generate(decoder, prompts, max_new_tokens=6, model_context=1024, warmup=False)
    single = Decoder(model, attention="reference", budget_step=8)
    for prompt, tokens in zip(prompts, together.tokens, strict=True):
        alone = generate(single, [prompt], max_new_tokens=6, model_context=1024, warmup=False)
        assert alone.tokens[0] == tokens, prompt


def test_sampling_is_seeded():
    decoder = Decoder(tiny_routed(0), attention="reference")
    runs = [generate(decoder, [[1, 2, 3]], max_new_tokens=12, model_context=1024, temperature=1.0, seed=s,
                     warmup=False).tokens for s in (7, 7, 8)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_bad_prompts():
    decoder = Decoder(tiny_routed(0), attention="reference")
    with pytest.raises(ContextError, match="empty"):
        generate(decoder, [[1, 2], []], max_new_tokens=4, model_context=1024)
    with pytest.raises(ContextError, match="context is 64"):
        generate(decoder, [list(range(60))], max_new_tokens=5, model_context=64)


def test_cli_batch_greedy_and_run_without_routers(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "g.json"
    args = ["--model", str(tiny_model_dir), "--prompt", "The history of", "--prompt", "A",
            "--max-new-tokens", "5", "--json", str(out)]
    assert main(args) == 0
    dense = json.loads(out.read_text())
    assert len(dense["tokens"]) == 2 and all(len(t) == 5 for t in dense["tokens"])
    assert "tokens/s" in capsys.readouterr().out
    # A run folder without router checkpoints: runs dense, says so, and generates the same text.
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    assert main([*args, "--surgery", str(run)]) == 0
    captured = capsys.readouterr()
    assert "running the DENSE model" in captured.err
    assert json.loads(out.read_text())["tokens"] == dense["tokens"]
    # A mistyped path, or a folder that is no run: an error, never a silent dense run.
    assert main([*args, "--surgery", str(tmp_path / "no-such-run")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main([*args, "--surgery", str(tmp_path)]) == 2
    assert "not a training run folder" in capsys.readouterr().err
    # Routers: the dense model runs the same prompts after the surgery, both speeds printed side by side.
    assert main([*args, "--surgery", "init"]) == 0
    table = capsys.readouterr().out
    assert "| dense |" in table and "| surgery |" in table and "| surgery ÷ dense |" in table
    compared = json.loads(out.read_text())
    assert compared["dense"]["tokens"] == dense["tokens"] and compared["dense"]["decode_tokens_per_s"] > 0
    assert main(["--model", str(tiny_model_dir), "--prompt", "", "--max-new-tokens", "2"]) == 2
    assert "empty" in capsys.readouterr().err
    assert main(["--model", str(tiny_model_dir), "--prompt", "word " * 1100]) == 2
    assert "context is 1024" in capsys.readouterr().err


@pytest.mark.slow
def test_three_paths_agree_smollm2(smollm2_dir):
    """The three paths on real weights: SmolLM2's first 4 layers (of 30; every layer runs the same code, and the
    programs unroll over the layers, so 4 compile in about 4/30 of the time)."""
    seed = fresh_seed()
    model = first_layers(load_model(smollm2_dir), 4)
    # conftest's whole-model bound for the cut model: 8 sums per layer over ≤ 1536 terms (the MLP width), 32 in
    # all: 1.3e-4 (measured 1.9e-6 to 1.24e-5 with all 30 layers, whose bound is 3.6e-4).
    decode_rtol = float32_bound(model.config.intermediate_size, depth=SUMS_PER_LAYER * model.config.num_hidden_layers)
    inject_routers(model, SPARSE_ROUTER, nnx.Rngs(seed), homotopy=False)
    tokens = jnp.asarray(np.random.default_rng(seed).integers(0, 49152, size=(1, 40)))
    # A budget of 40, the whole sequence: no head can see more, so one decode compile of the layers (at 32 a
    # head often saw more, and the step compiled again at 64). The gather still picks the visible keys out of the
    # cache's 128 slots; an overflowing budget and its repeated step: the tiny model's three paths (budgets of 8).
    train_path, prefilled, decoded, _ = three_paths(model, tokens, prompt_len=30, gather=True, budget_step=40)
    assert_close(train_path, prefilled, f"seed {seed}: SmolLM2 prefill vs training path")
    assert_close(train_path, decoded, f"seed {seed}: SmolLM2 prefill + decode vs training path", decode_rtol)


def test_generation_stops_at_any_of_llama31s_eos_ids(tmp_path):
    """Llama 3.1's config lists three end-of-sequence ids: the converted config stays hashable (static under
    nnx.jit), and every row of a batch stops at the first of any of them."""
    from conftest import make_hf_llama

    from llama_surgery_jax.model.conversion import convert

    hf = make_hf_llama(tmp_path / "hf", eos_token_id=[5, 6, 7])
    model = load_model(convert(hf, tmp_path / "converted", progress=False))
    assert model.config.eos_token_ids == (5, 6, 7)
    hash(model.config)
    nnx.jit(lambda m, t: m(t)[0])(model, jnp.zeros((1, 4), jnp.int32))

    prompts = [[11, 12, 13], [21, 22], [31, 32, 33, 34]]
    decoder = Decoder(model, attention="reference")
    run = functools.partial(generate, decoder, prompts, max_new_tokens=8,
                            model_context=model.config.max_position_embeddings, warmup=False)
    free = run(eos_ids=()).tokens
    unused = next(t for t in range(model.config.vocab_size) if all(t not in row for row in free))
    eos = (free[0][2], free[1][4], unused)
    expected = []
    for row in free:
        ends = [i for i, token in enumerate(row) if token in eos]
        expected.append(row[:ends[0] + 1] if ends else row)
    assert sum(len(e) < len(r) for e, r in zip(expected, free, strict=True)) >= 2, (free, eos)
    assert run(eos_ids=eos).tokens == expected


def test_decode_past_the_cache_is_an_error():
    """JAX drops a write past the last slot silently; the decoder refuses the step instead."""
    decoder = Decoder(tiny_routed(0), attention="reference")
    tokens = jnp.ones((1, 128), jnp.int32)  # caches hold whole blocks of 128 slots: this one is full
    _, cache = decoder.prefill(tokens, jnp.array([128]), 128)
    assert cache.layers[0].k.shape[1] == 128
    with pytest.raises(ContextError, match="the cache is full"):
        decoder.step(cache, jnp.ones((1,), jnp.int32))
