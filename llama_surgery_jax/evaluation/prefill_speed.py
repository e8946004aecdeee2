"""Prefill speed, the library of `python -m llama_surgery_jax.speed`: the models it times, the compiled prefill
program, and its rows (`prefill`: dense against surgery end to end; `layer`: one decoder layer's pieces; `check`:
the kernel prefill against the reference evaluation forward on the same tiles). The CLI's docstring says what each
row measures; `evaluation.speed_report` runs them and writes the tables.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from llama_surgery_jax.inference.cache import init_cache, prefill
from llama_surgery_jax.model.config import ModelConfig, Precision
from llama_surgery_jax.model.llama import LlamaForCausalLM, dense_attention
from llama_surgery_jax.surgery.block_routing import select_rows
from llama_surgery_jax.surgery.config import RouterConfig
from llama_surgery_jax.surgery.routed_attention import inject_routers, routed_layers
from llama_surgery_jax.surgery.router import route_blocks, route_rows

BF16 = Precision("bfloat16", "bfloat16")
BF16_U = 2.0**-8
ROUTER_8B = RouterConfig(mode="block", d_max=0, p=2, levels=7, window=128, block_size=128, routing_heads="kv")
ROW_TREES = 4  # the row router's trees (router.query=row), as trained in docs/results/gpu-row-thresholds


def random_router(router: RouterConfig, tile: int, query: str) -> RouterConfig:
    """router at another tile, ranking key blocks per query block ("block") or per query row ("row")."""
    return dataclasses.replace(router, block_size=tile, query=query, trees=ROW_TREES if query == "row" else 1)


def default_router(tile: int, query: str = "block") -> RouterConfig:
    """The default training preset's block router at another tile (its own is 64)."""
    from llama_surgery_jax.training.config import TrainConfig

    return random_router(TrainConfig.preset("default").router, tile, query)


def build_model(name: str, tile: int, run: str | None, seed: int = 0,
                query: str = "block") -> tuple[LlamaForCausalLM, str]:
    """(the model with routers, a description). The dense model is the same one without them. query: the random
    routers rank key blocks per query block or per query row (a trained run's routers are as trained)."""
    if name == "smollm2":
        from llama_surgery_jax.model.checkpoint import load_model
        from llama_surgery_jax.model.embedded import default_model_dir

        model = load_model(default_model_dir(), BF16)
        if run:
            from llama_surgery_jax.training.checkpoints import load_trained_routers

            model, router, _ = load_trained_routers(model, run)
            return model, f"SmolLM2-135M, trained routers of {run} (tile {router.block_size})"
        inject_routers(model, default_router(tile, query), nnx.Rngs(seed + 1))
        return model, f"SmolLM2-135M, random {query} routers (tile {tile})"
    config = ModelConfig.named(name)
    model = LlamaForCausalLM(config, precision=BF16, rngs=nnx.Rngs(seed))
    inject_routers(model, random_router(ROUTER_8B, tile, query), nnx.Rngs(seed + 1))
    return model, f"{name}, random bf16 weights and {query} routers (tile {tile})"


def dense_and_routed(model: LlamaForCausalLM):
    """((graphdef, state) of the dense model, the same of the routed one): one set of weights, shared."""
    from llama_surgery_jax.surgery.routed_attention import remove_routers

    impls = [layer.self_attn.attention_impl for layer in model.model.layers]
    routed = nnx.split(model)
    dense = nnx.split(remove_routers(model))
    for layer, impl in zip(model.model.layers, impls, strict=True):  # the model keeps its routers
        layer.self_attn.attention_impl = nnx.data(impl)
    return dense, routed


def prefill_program(graphdef, state, batch: int, length: int, attention: str):
    """A compiled prefill: (state, tokens, density) → (last logits [b, vocab], cache, executed block density)."""
    lengths = jnp.full((batch,), length, jnp.int32)

    def run(state, tokens, density):
        logits, cache, aux = prefill(nnx.merge(graphdef, state), tokens, lengths, max_len=length, attention=attention,
                                     last_only=True, return_aux=True, block_density=density)
        executed = [jnp.mean(a["block_density"]) for a in aux if "block_density" in a]
        return logits, cache, jnp.mean(jnp.stack(executed)) if executed else jnp.float32(1.0)

    tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    density = jax.ShapeDtypeStruct((), jnp.float32)
    start = time.perf_counter()
    compiled = jax.jit(run).lower(state, tokens, density).compile()
    return compiled, time.perf_counter() - start


def program_memory_gib(compiled) -> float:
    """Arguments + outputs + temporaries − aliased, from XLA's memory analysis (nan where the backend has none)."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return float("nan")
    total = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes + analysis.temp_size_in_bytes
             - analysis.alias_size_in_bytes)
    return total / 2**30


def median_seconds(fn, *args, reps: int) -> tuple[float, object]:
    """Median wall seconds of `reps` calls after one warm-up (outputs waited for; the last kept)."""
    out = jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        del out
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def prefill_rows(model: LlamaForCausalLM, described: str, lengths, densities, reps: int, seed: int = 0):
    """Dense and surgery prefill rows at each length (batch 1)."""
    (dense_def, dense_state), (routed_def, routed_state) = dense_and_routed(model)
    for length in lengths:
        tokens = jax.random.randint(jax.random.key(seed + length), (1, length), 0, model.config.vocab_size)
        compiled, compile_s = prefill_program(dense_def, dense_state, 1, length, "kernel")
        seconds, _ = median_seconds(compiled, dense_state, tokens, jnp.float32(1.0), reps=reps)
        dense_s = seconds
        yield {"kind": "prefill", "model": described, "length": length, "attention": "dense (cuDNN)",
               "density": 1.0, "seconds": seconds, "tokens_per_s": length / seconds, "speedup": 1.0,
               "memory_gib": program_memory_gib(compiled), "compile_s": compile_s}
        del compiled
        compiled, compile_s = prefill_program(routed_def, routed_state, 1, length, "kernel")
        for density in densities:
            seconds, out = median_seconds(compiled, routed_state, tokens, jnp.float32(density), reps=reps)
            yield {"kind": "prefill", "model": described, "length": length, "attention": "surgery (block-sparse)",
                   "density": float(out[2]), "requested_density": density, "seconds": seconds,
                   "tokens_per_s": length / seconds, "speedup": dense_s / seconds,
                   "memory_gib": program_memory_gib(compiled), "compile_s": compile_s}
            del out
        del compiled


def layer_rows(model: LlamaForCausalLM, described: str, lengths, densities, reps: int, seed: int = 0):
    """One layer's router, schedule and attention on random inputs, × layers (what a prefill spends on each)."""
    from pallas_kernels import block_sparse_attention, build_schedule

    config = model.config
    layer = routed_layers(model)[0]
    router = layer.config
    params = layer.router.parameters()
    heads = layer.router.routing_heads
    for length in lengths:
        keys = jax.random.split(jax.random.key(seed + length), 4)
        x = jax.random.normal(keys[0], (1, length, config.hidden_size), jnp.bfloat16)
        q = jax.random.normal(keys[1], (1, length, config.num_attention_heads, config.head_dim), jnp.bfloat16)
        k, v = (jax.random.normal(key, (1, length, config.num_key_value_heads, config.head_dim), jnp.bfloat16)
                for key in keys[2:])
        n = -(-length // router.block_size)

        @jax.jit
        def route(params, x, density, n=n, t=length):
            """→ (tiles, first rows or None): the router's mask at ρ, as the prefill builds it."""
            budgets = layer.row_budgets(n, density)
            if router.query == "row":
                scores = layer.row_router_scores(route_rows(params, x, config=router, routing_heads=heads), t)
                first_rows = select_rows(scores, budgets, t=t, tile=router.block_size, window=router.window,
                                         sink=router.sink, front=router.row_front)
                return first_rows < router.block_size, first_rows
            routing = route_blocks(params, x, config=router, routing_heads=heads)
            return layer.select("router", routing, None, None, None, budgets, n), None

        schedule = jax.jit(build_schedule)
        sparse = jax.jit(lambda q, k, v, mask: block_sparse_attention(q, k, v, mask[0], tile=router.block_size,
                                                                     first_rows=mask[1]))
        dense = jax.jit(lambda q, k, v: dense_attention(q, k, v, attention="kernel")[0])
        dense_s, _ = median_seconds(dense, q, k, v, reps=reps)
        for density in densities:
            route_s, mask = median_seconds(route, params, x, jnp.float32(density), reps=reps)
            schedule_s, _ = median_seconds(schedule, *mask, reps=reps)
            sparse_s, _ = median_seconds(sparse, q, k, v, mask, reps=reps)
            layers = config.num_hidden_layers
            yield {"kind": "layer", "model": described, "length": length, "density": density,
                   "router_ms": 1e3 * route_s * layers, "schedule_ms": 1e3 * schedule_s * layers,
                   "sparse_attention_ms": 1e3 * sparse_s * layers, "dense_attention_ms": 1e3 * dense_s * layers,
                   "attention_speedup": dense_s / sparse_s,
                   "router_and_schedule_fraction": (route_s + schedule_s) / sparse_s}


def check_row(model: LlamaForCausalLM, described: str, length: int, density: float, seed: int = 0) -> dict:
    """The kernel prefill against the evaluation forward on the reference attention, same tiles (replayed)."""
    tokens = jax.random.randint(jax.random.key(seed), (1, length), 0, model.config.vocab_size)
    lengths = jnp.full((1,), length, jnp.int32)

    @nnx.jit
    def kernel_prefill(model, tokens):
        hidden, aux, _ = model.hidden_states(tokens, mode="prefill", cache=init_cache(model, 1, length),
                                             lengths=lengths, attention="kernel", block_density=density,
                                             return_tiles=True)
        return hidden, tuple(a["tiles"] for a in aux)

    @nnx.jit
    def reference_forward(model, tokens, tiles):
        return model.hidden_states(tokens, train=False, attention="reference", selection="given", given_tiles=tiles,
                                   block_density=density)[0]

    # Final hidden states, not logits, of every position: the 8B's logits at 8k would be 4 GB per path.
    hidden, tiles = kernel_prefill(model, tokens)
    reference = reference_forward(model, tokens, tiles)
    logits = model.logits(hidden[:, -1:])[:, 0]
    reference_logits = model.logits(reference[:, -1:])[:, 0]

    def relative(a, b):
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
        return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))

    layers = model.config.num_hidden_layers
    # Each layer's attention output is rounded to bf16 on both paths, by other arithmetic (the kernel's exp2 and
    # tiled online softmax, the reference's chunked float32 softmax): up to 2u apart per layer, adding up as a
    # random walk over the layers; margin 4.
    bound = 4 * 2 * math.sqrt(layers) * BF16_U
    errors = {"hidden_error": relative(hidden, reference), "logits_error": relative(logits, reference_logits)}
    return {"kind": "check", "model": described, "length": length, "density": density, **errors, "bound": bound,
            "same_next_token": bool(jnp.argmax(logits) == jnp.argmax(reference_logits)),
            "passed": max(errors.values()) < bound}
