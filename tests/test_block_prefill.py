"""Block mode's prefill (the fast path of the sparse-prefill issue): the sort-free selection is the selection rule,
prefill computes the evaluation forward's function on ragged batches, and the kernel path agrees with the
reference at the model level (interpret mode)."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import BF16_U, TINY_LOGITS_BOUND, first_layers, fresh_seed
from flax import nnx
from test_block_routing import brute_force_tiles

from llama_surgery_jax.inference.cache import prefill
from llama_surgery_jax.model.config import ModelConfig, Precision
from llama_surgery_jax.model.llama import LlamaForCausalLM
from llama_surgery_jax.surgery import block_routing as br
from llama_surgery_jax.surgery.config import RouterConfig
from llama_surgery_jax.surgery.mask import band_tiles
from llama_surgery_jax.surgery.routed_attention import inject_routers

TINY = ModelConfig.named("tiny")
BLOCK = RouterConfig(mode="block", d_max=0, levels=4, window=8, block_size=8, routing_heads="kv", block_density=0.4)


@pytest.mark.parametrize("p,levels,tile,window", [(2, 4, 8, 8), (3, 2, 4, 0), (2, 1, 16, None), (5, 3, 8, 20)])
def test_sort_free_selection_is_the_rule(p, levels, tile, window):
    """select_by_depth ≡ the brute-force rule (deepest first, ties to the most recent block), budgets exact."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    t = int(rng.integers(40, 300))
    n = -(-t // tile)
    q_codes, k_codes = (jnp.asarray(rng.integers(0, p**levels, (2, 3, n))) for _ in range(2))
    forced = band_tiles(n, tile=tile, window=window, sink=True)
    budgets = br.row_budgets(jnp.asarray(rng.uniform(0.02, 1.0, 3), jnp.float32), jnp.sum(forced, -1, dtype=jnp.int32))
    depth = br.shared_prefix_depth(q_codes[..., :, None], k_codes[..., None, :], p=p, levels=levels)
    tiles = np.asarray(br.select_by_depth(depth, budgets, levels=levels, tile=tile, window=window, sink=True))
    expected = brute_force_tiles(np.asarray(depth, np.float64), np.asarray(budgets), np.asarray(forced))
    np.testing.assert_array_equal(tiles, expected, err_msg=f"seed {seed}")
    np.testing.assert_array_equal(tiles.sum(-1), np.broadcast_to(budgets, tiles.shape[:-1]), err_msg=f"seed {seed}")


def block_model(seed: int, config: ModelConfig = TINY, precision: Precision = Precision(),
                router: RouterConfig = BLOCK) -> LlamaForCausalLM:
    model = LlamaForCausalLM(config, precision=precision, rngs=nnx.Rngs(seed))
    return inject_routers(model, router, nnx.Rngs(seed + 1))


def test_block_prefill_is_the_evaluation_forward_on_ragged_prompts():
    """Each prompt of a right-padded batch gets, at its real positions, the codes and tiles of the evaluation
    forward of that prompt alone, and its logits up to float32 reordering (other batch and chunk shapes); the
    codes land in the cache."""
    seed = fresh_seed()
    model = block_model(seed)
    lengths = [150, 97, 64]
    tokens = jax.random.randint(jax.random.key(seed), (3, 150), 0, TINY.vocab_size)
    run = nnx.jit(lambda m, x, n: prefill(m, x, n, max_len=160, block_density=0.3))
    logits, cache = run(model, tokens, jnp.asarray(lengths))
    last, _ = nnx.jit(lambda m, x, n: prefill(m, x, n, max_len=160, block_density=0.3, last_only=True))(
        model, tokens, jnp.asarray(lengths))
    forward = nnx.jit(lambda m, x: m(x, train=False, block_density=0.3, return_codes=True))
    for row, length in enumerate(lengths):
        alone, aux = forward(model, tokens[row:row + 1, :length])
        atol = TINY_LOGITS_BOUND * float(jnp.max(jnp.abs(alone)))
        np.testing.assert_allclose(logits[row, :length], alone[0], rtol=0, atol=atol, err_msg=f"seed {seed}")
        np.testing.assert_allclose(last[row], alone[0, -1], rtol=0, atol=atol, err_msg=f"seed {seed}")
        blocks = -(-length // BLOCK.block_size)
        q_codes, k_codes = aux[1]["codes"]
        np.testing.assert_array_equal(cache.layers[1].codes[row, :, 0, :blocks], q_codes[0], err_msg=f"seed {seed}")
        full = length // BLOCK.block_size  # a block that holds padding keeps the padded batch's key code
        np.testing.assert_array_equal(cache.layers[1].codes[row, :, 1, :full], k_codes[0, :, :full],
                                      err_msg=f"seed {seed}")
    assert np.all(np.asarray(cache.layers[0].codes[:, :, :, -1]) == -1), "slots past the prompt stay unwritten"


def test_block_prefill_on_the_kernel_matches_the_reference():
    """The kernel path (interpret mode on CPU, bf16) of a whole routed model against its reference path with the
    tiles the reference chose: the prefill's tiles, replayed, are the reference's, and the logits agree within
    bf16 rounding (each layer's attention rounds its output once more than the reference's float32 path)."""
    seed = fresh_seed()
    config = dataclasses.replace(TINY, head_dim=64)
    router = dataclasses.replace(BLOCK, block_size=16, window=16)  # the kernels' smallest tile
    model = block_model(seed, config, Precision("bfloat16", "bfloat16"), router)
    tokens = jax.random.randint(jax.random.key(seed), (2, 160), 0, TINY.vocab_size)
    lengths = jnp.asarray([160, 160])

    def run(attention):
        return nnx.jit(lambda m, x, n: prefill(m, x, n, max_len=160, attention=attention, block_density=0.4))(
            model, tokens, lengths)

    kernel_logits, kernel_cache = run("kernel")
    reference_logits, reference_cache = run("reference")
    same_codes = np.mean(np.asarray(kernel_cache.layers[-1].codes) == np.asarray(reference_cache.layers[-1].codes))
    # Routing reads the layer input, which differs by rounding in the last layer: codes may flip only at near-ties.
    np.testing.assert_array_equal(kernel_cache.layers[0].codes, reference_cache.layers[0].codes)
    assert same_codes > 0.9, f"seed {seed}: {same_codes:.2f} of the last layer's codes agree"
    error = float(jnp.linalg.norm(kernel_logits - reference_logits) / jnp.linalg.norm(reference_logits))
    # Two layers, each adding at most a few bf16 roundings to the residual stream; margin 4.
    bound = 4 * 2 * math.sqrt(config.num_hidden_layers) * BF16_U
    assert error < bound, f"seed {seed}: relative logits error {error:.2e} ≥ {bound:.2e}"


@pytest.mark.parametrize("t,tile", [(100, 8), (37, 4), (5, 8), (257, 64)])
def test_block_features_from_block_sums_are_the_two_definitions(t, tile):
    """One pass over x gives the causal query features (`pooled_block_features`) and the key features
    (`key_block_features`) up to float32 reordering: sums of ≤ 2·tile terms, margin 10."""
    from llama_surgery_jax.surgery.router import block_features, key_block_features, pooled_block_features

    seed = fresh_seed()
    x = jax.random.normal(jax.random.key(seed), (2, t, 24), jnp.float32)
    query, key = block_features(x, tile)
    bound = 10 * 2 * tile * 2.0**-24 * float(jnp.max(jnp.abs(x)))
    np.testing.assert_allclose(query, pooled_block_features(x, tile), rtol=0, atol=bound, err_msg=f"seed {seed}")
    np.testing.assert_allclose(key, key_block_features(x, tile), rtol=0, atol=bound, err_msg=f"seed {seed}")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_block_decode_equals_re_prefill(dtype):
    """KV-cache decode against a full re-prefill with the same hard mask (the evaluation forward on the whole sequence
    each step), on a ragged batch whose prompts end inside a block, for more steps than a block holds: blocks open and
    fill during decode. float32: the greedy tokens are equal. bf16: the two paths round differently (a cache of bf16
    K/V against a whole forward), and a random tiny model's near-uniform logits let a greedy token flip where its top
    two lie within that rounding (seed 1447845276: row 1 at step 39), so both paths are fed the same 40 random tokens
    and every step's logits agree within the bf16 bound (4 · 2 · √layers · u relative, as the kernel checks)."""
    from llama_surgery_jax.evaluation.niah import Reprefill
    from llama_surgery_jax.inference.cache import Decoder
    from llama_surgery_jax.inference.generate import generate

    seed = fresh_seed()
    model = block_model(seed, precision=Precision(dtype, dtype))
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, TINY.vocab_size, size).tolist() for size in (45, 30, 61)]
    steps = 40
    if dtype == "float32":
        kwargs = dict(max_new_tokens=steps, model_context=TINY.max_position_embeddings)
        decoded = generate(Decoder(model), prompts, **kwargs).tokens
        again = generate(Reprefill(model, train=False), prompts, **kwargs).tokens
        assert decoded == again, f"seed {seed}"
        return
    lengths = jnp.asarray([len(p) for p in prompts])
    padded = jnp.asarray([p + [0] * (max(map(len, prompts)) - len(p)) for p in prompts])
    following = jnp.asarray(rng.integers(3, TINY.vocab_size, (steps, len(prompts))), jnp.int32)
    bound = 4 * 2 * math.sqrt(TINY.num_hidden_layers) * BF16_U
    paths = [Decoder(model), Reprefill(model, train=False)]
    states = [path.prefill(padded, lengths, int(lengths.max()) + steps) for path in paths]
    logits, cache = states[0]
    states[0] = (logits[jnp.arange(len(prompts)), lengths - 1], cache)  # decode's prefill gives every position's
    for step in range(steps + 1):
        (mine, _), (expected, _) = states
        for row in range(len(prompts)):
            error = float(jnp.linalg.norm((mine[row] - expected[row]).astype(jnp.float32))
                          / jnp.linalg.norm(expected[row].astype(jnp.float32)))
            assert error <= bound, f"seed {seed}, step {step}, row {row}: relative logits error {error:.2e}"
        if step < steps:
            states = [path.step(cache, following[step]) for path, (_, cache) in zip(paths, states, strict=True)]


def test_row_selection_is_the_prefill_rule():
    """select_row_by_depth on row m ≡ row m of select_by_depth, for every row (what decode and prefill run)."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    n, levels = 23, 3
    q_codes, k_codes = (jnp.asarray(rng.integers(0, 2**levels, (2, 3, n))) for _ in range(2))
    forced = band_tiles(n, tile=8, window=8, sink=True)
    budgets = br.row_budgets(jnp.asarray(rng.uniform(0.05, 1.0, 3), jnp.float32), jnp.sum(forced, -1, dtype=jnp.int32))
    rule = dict(levels=levels, tile=8, window=8, sink=True)
    depth = br.shared_prefix_depth(q_codes[..., :, None], k_codes[..., None, :], p=2, levels=levels)
    whole = br.select_by_depth(depth, budgets, **rule)
    for m in range(n):
        rows = jnp.asarray([m, n - 1 - m])
        picked = br.select_row_by_depth(depth[jnp.arange(2), :, rows], budgets, rows, **rule)
        np.testing.assert_array_equal(picked, whole[jnp.arange(2), :, rows], err_msg=f"seed {seed}, row {m}")


def test_block_decode_on_the_kernel_matches_the_reference():
    """One decode step with `sparse_decode_attention` (interpret mode, bf16) against the masked reference on the
    same cache: the same codes and tiles, logits within bf16 rounding (two layers, margin 4)."""
    from llama_surgery_jax.inference.cache import decode_step
    from llama_surgery_jax.surgery.config import RouterExecution
    from llama_surgery_jax.surgery.routed_attention import routed_layers

    seed = fresh_seed()
    router = dataclasses.replace(BLOCK, block_size=16, window=16)
    model = block_model(seed, dataclasses.replace(TINY, head_dim=64), Precision("bfloat16", "bfloat16"), router)
    tokens = jax.random.randint(jax.random.key(seed), (3, 150), 0, TINY.vocab_size)
    lengths = jnp.asarray([150, 97, 64])
    _, cache = nnx.jit(lambda m, x, n: prefill(m, x, n, max_len=160, last_only=True))(model, tokens, lengths)
    following = jax.random.randint(jax.random.key(seed + 1), (3,), 0, TINY.vocab_size)

    def step(backend):
        for layer in routed_layers(model):
            layer.execution = RouterExecution(attention_backend=backend)
        return nnx.jit(lambda m, c, t: decode_step(m, c, t)[:2])(model, cache, following)

    (kernel, kernel_cache), (reference, reference_cache) = step("kernel"), step("reference")
    np.testing.assert_array_equal(kernel_cache.layers[0].codes, reference_cache.layers[0].codes)
    error = float(jnp.linalg.norm(kernel - reference) / jnp.linalg.norm(reference))
    bound = 4 * 2 * math.sqrt(TINY.num_hidden_layers) * BF16_U
    assert error < bound, f"seed {seed}: relative logits error {error:.2e} ≥ {bound:.2e}"


def test_dense_decode_on_the_kernel_matches_the_masked_attention():
    """A dense model's decode step with flash-decoding (`dense_decode_attention`, interpret mode, bf16) against the
    masked attention over the cache, ragged batch: logits within bf16 rounding (two layers, margin 4)."""
    from llama_surgery_jax.inference.cache import decode_step

    seed = fresh_seed()
    config = dataclasses.replace(TINY, head_dim=64)
    model = LlamaForCausalLM(config, precision=Precision("bfloat16", "bfloat16"), rngs=nnx.Rngs(seed))
    tokens = jax.random.randint(jax.random.key(seed), (3, 150), 0, TINY.vocab_size)
    _, cache = nnx.jit(lambda m, x, n: prefill(m, x, n, max_len=160, last_only=True))(model, tokens,
                                                                                    jnp.asarray([150, 97, 64]))
    assert cache.layers[0].k.shape[1] == 256, "caches hold whole blocks of 128 slots"
    following = jax.random.randint(jax.random.key(seed + 1), (3,), 0, TINY.vocab_size)
    step = nnx.jit(lambda m, c, t, attention: decode_step(m, c, t, attention=attention)[0], static_argnums=3)
    kernel, masked = step(model, cache, following, "kernel"), step(model, cache, following, None)
    error = float(jnp.linalg.norm(kernel - masked) / jnp.linalg.norm(masked))
    bound = 4 * 2 * math.sqrt(TINY.num_hidden_layers) * BF16_U
    assert error < bound, f"seed {seed}: relative logits error {error:.2e} ≥ {bound:.2e}"


@pytest.mark.parametrize("routed", [False, True])
def test_greedy_decode_in_one_program_is_the_step_loop(routed):
    """`greedy_decode` (the steps in one `lax.scan`, routing decided on the device) gives the tokens and cache of
    one `decode_step` call per token with routing decided on the host, dense and block-routed, on a ragged batch
    for more steps than a block holds."""
    from llama_surgery_jax.inference.cache import decode_step, greedy_decode, routing_due

    seed = fresh_seed()
    model = block_model(seed) if routed else LlamaForCausalLM(TINY, precision=Precision(), rngs=nnx.Rngs(seed))
    tokens = jax.random.randint(jax.random.key(seed), (3, 61), 0, TINY.vocab_size)
    _, cache = nnx.jit(lambda m, x, n: prefill(m, x, n, max_len=100, last_only=True))(model, tokens,
                                                                                    jnp.asarray([45, 30, 61]))
    first = jax.random.randint(jax.random.key(seed + 1), (3,), 0, TINY.vocab_size)
    looped, looped_cache = nnx.jit(lambda m, c, t: greedy_decode(m, c, t, 20))(model, cache, first)
    # The step loop decides on the host whether a step routes (two programs, no cond), as a server would.
    step = nnx.jit(lambda m, c, t, route: decode_step(m, c, t, route=route)[:2], static_argnums=3)
    stepped, token = [], first
    for _ in range(20):
        route = None
        if routed:
            rows = np.asarray(cache.layers[0].selection.row)
            route = bool(np.any(routing_due(np.asarray(cache.lengths), rows, BLOCK.block_size)))
        logits, cache = step(model, cache, token, route)
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        stepped.append(token)
    np.testing.assert_array_equal(looped, jnp.stack(stepped, axis=1), err_msg=f"seed {seed}")
    np.testing.assert_array_equal(looped_cache.lengths, cache.lengths)
    for mine, theirs in zip(looped_cache.layers, cache.layers, strict=True):
        # The same function in two programs (a scan body against single steps): float32 reordering only, bounded
        # as the tiny model's logits are (conftest.logits_bound, the model's sums and depth).
        assert np.abs(mine.k - theirs.k).max() <= TINY_LOGITS_BOUND * np.abs(theirs.k).max(), f"seed {seed}"
        if routed:
            np.testing.assert_array_equal(mine.codes, theirs.codes)
            np.testing.assert_array_equal(mine.selection.blocks, theirs.selection.blocks)


@pytest.mark.parametrize("routed", [False, True])
def test_generate_in_device_loops_is_the_step_loop(routed):
    """Greedy `generate` through `Decoder.greedy` (chunks of steps in device loops) gives the tokens of one host
    step per token, dense and block-routed, on a ragged batch; a row stops at its end-of-sequence token."""
    from llama_surgery_jax.inference.cache import Decoder
    from llama_surgery_jax.inference.generate import generate

    seed = fresh_seed()
    model = block_model(seed) if routed else LlamaForCausalLM(TINY, precision=Precision(), rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, TINY.vocab_size, size).tolist() for size in (45, 30, 61)]
    kwargs = dict(max_new_tokens=40, model_context=TINY.max_position_embeddings)
    looped = generate(Decoder(model), prompts, **kwargs)
    stepping = Decoder(model)
    stepping.loops = False
    stepped = generate(stepping, prompts, **kwargs)
    assert looped.tokens == stepped.tokens and looped.decode_steps == 39, f"seed {seed}"
    eos = looped.tokens[1][10]  # an end-of-sequence id that row 1 meets at its 11th token
    stopped = generate(Decoder(model), prompts, eos_ids=(eos,), **kwargs).tokens
    assert stopped[1] == looped.tokens[1][:looped.tokens[1].index(eos) + 1], f"seed {seed}"


def test_greedy_plan_routes_where_a_block_opens_or_fills():
    from llama_surgery_jax.inference.cache import greedy_plan

    route, plain = (True, 1), (False, 1)
    # Index 16 opens block 2 (and the kept row is stale), 23 fills it, 24 opens block 3, 31 fills it, 32 opens 4.
    assert greedy_plan([16], [-1], 20, 8) == [route, (False, 4), plain, plain, route, route, (False, 4), plain,
                                              plain, route, route, plain, plain, plain]
    # Two sequences out of phase (index 15 fills a block, 16 opens one, then 15 again): each one's boundaries route
    # the whole batch; a kept row for the current block needs no routing.
    assert greedy_plan([10, 13], [1, 1], 6, 8) == [plain, plain, route, route, plain, route]


def test_greedy_plan_decode_is_the_step_loop():
    """Decode by `greedy_plan` runs (programs that route one step, programs of steps that do not) gives the tokens of
    one step at a time with routing decided on the device, on a ragged batch over several blocks."""
    from llama_surgery_jax.inference.cache import decode_step, greedy_decode, greedy_plan

    seed = fresh_seed()
    model = block_model(seed)
    tokens = jax.random.randint(jax.random.key(seed), (2, 61), 0, TINY.vocab_size)
    _, cache = nnx.jit(lambda m, x, n: prefill(m, x, n, max_len=100, last_only=True))(model, tokens,
                                                                                    jnp.asarray([45, 61]))
    first = jax.random.randint(jax.random.key(seed + 1), (2,), 0, TINY.vocab_size)
    plan = greedy_plan(np.asarray(cache.lengths), np.asarray(cache.layers[0].selection.row), 30, BLOCK.block_size)
    assert (False, 4) in plan and (True, 1) in plan
    run = nnx.jit(lambda m, c, t, route, n: greedy_decode(m, c, t, n, route=route), static_argnums=(3, 4))
    planned, planned_cache, token = [], cache, first
    for route, n in plan:
        new, planned_cache = run(model, planned_cache, token, route, n)
        planned.append(new)
        token = new[:, -1]
    step = nnx.jit(lambda m, c, t: decode_step(m, c, t)[:2])
    stepped, token = [], first
    for _ in range(30):
        logits, cache = step(model, cache, token)
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        stepped.append(token)
    np.testing.assert_array_equal(jnp.concatenate(planned, axis=1), jnp.stack(stepped, axis=1), err_msg=f"seed {seed}")
    for mine, theirs in zip(planned_cache.layers, cache.layers, strict=True):
        np.testing.assert_array_equal(mine.codes, theirs.codes)
        np.testing.assert_array_equal(mine.selection.blocks, theirs.selection.blocks)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_smollm2_block_decode_equals_re_prefill(smollm2_dir, dtype):
    """The exactness check on real weights: SmolLM2's first 4 layers (of 30) with random block routers (the default
    preset's tree, per KV head, at tile 16 and W 16 so that a short sequence has 15 blocks and the budget reaches past
    the window), 32
    decode steps from a 200-token prompt, KV-cache decode against a full re-prefill with the same hard mask, at
    ρ = 0.5. The 32 steps (positions 200 to 231) fill the prompt's last block (207), open and fill a whole block
    (208, 223) and open another (224): every routing event of decode, each at least once (64 steps repeated them;
    the cost is the compiles, not the steps). Both dtypes run the same three programs: `Decoder.prefill`,
    `Decoder.step` (two programs, for the steps that route and those that do not, the host deciding which) and the
    whole forward; greedy tokens in device loops are those of the step loop (`Decoder.greedy`: tested on the tiny
    model, `test_generate_in_device_loops_is_the_step_loop`), so they need no compiles of SmolLM2 here.

    Four layers, not 30: the cache mechanics are the same code in every layer (each layer's K/V, codes, ring and
    selection, decided from that layer's input), and what the real weights bring (SmolLM2's heads, GQA 3:1, head dim
    64, tied embeddings, real activations to route) is there from the first layer; layers 2 to 4 route an input that
    earlier layers computed through the cache, as every deeper layer does. The programs are unrolled over the layers,
    so the compiles (the cost of this test) take about 4/30 of the time.

    The re-prefill of every step is one forward of the whole sequence: row i of the routed model depends on tokens
    ≤ i only (tested on the tiny model, `test_block_routed_model_is_causal`), so position p's logits of one forward
    of the 232 tokens are those a re-prefill of the first p + 1 tokens reads.

    float32: greedy decode (the argmax of each step's logits, fed back): decode's 33 greedy tokens (read at positions
    199 to 231) are the argmax of that forward at every step, so a greedy re-prefill would choose them all (by
    induction over the steps). bf16: decode and re-prefill round differently (a cache of bf16 K/V against a whole
    forward), and random routers on real weights give near-uniform logits, so a greedy token can flip where the top
    two logits lie within that rounding (seed 741990227: a margin of 0.011 at step 3, logits 0.34 apart of 30). So
    bf16 is checked teacher-forced on 32 random tokens: every step's logits (positions 199 to 231) within the bf16
    bound of the two paths (4 · 2 · √layers · u relative, as the kernel checks)."""
    from llama_surgery_jax.inference.cache import Decoder
    from llama_surgery_jax.model.checkpoint import load_model
    from llama_surgery_jax.training.config import TrainConfig

    seed = fresh_seed()
    model = first_layers(load_model(smollm2_dir, Precision(dtype, dtype)), 4)
    router = dataclasses.replace(TrainConfig.preset("default").router, query="block", trees=1, block_size=16,
                                 window=16, block_density=0.5)
    inject_routers(model, router, nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    prompt = rng.integers(3, model.config.vocab_size, 200).tolist()
    steps = 32
    following = rng.integers(3, model.config.vocab_size, steps).tolist()  # bf16's teacher-forced tokens
    decoder = Decoder(model)
    logits, cache = decoder.prefill(jnp.asarray([prompt]), jnp.asarray([len(prompt)]), len(prompt) + steps)
    decoded = [logits[0, -1]]  # decode's logits at positions 199 to 231: the prompt's last, then one per step
    fed = []
    for step in range(steps):
        fed.append(int(np.argmax(np.asarray(decoded[-1]))) if dtype == "float32" else following[step])
        logits, cache = decoder.step(cache, jnp.asarray([fed[-1]], jnp.int32))
        decoded.append(logits[0])
    whole = nnx.jit(lambda m, x: m(x, train=False)[0])
    reference = whole(model, jnp.asarray([prompt + fed]))[0, len(prompt) - 1:]
    if dtype == "float32":
        greedy = [int(np.argmax(np.asarray(row))) for row in decoded]
        assert greedy[:-1] == fed and len(greedy) == steps + 1, f"seed {seed}"
        again = np.argmax(np.asarray(reference), axis=-1).tolist()
        parted = int(np.argmin(np.equal(greedy, again)))
        assert greedy == again, f"seed {seed}: decode and re-prefill part at step {parted}"
        return
    bound = 4 * 2 * math.sqrt(model.config.num_hidden_layers) * BF16_U
    for step, (mine, expected) in enumerate(zip(decoded, reference, strict=True)):
        error = float(jnp.linalg.norm(mine - expected) / jnp.linalg.norm(expected))
        assert error <= bound, f"seed {seed}, step {step}: relative logits error {error:.2e} > {bound:.2e}"
