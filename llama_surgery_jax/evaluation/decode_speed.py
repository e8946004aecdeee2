"""Decode speed of the surgery model against the dense model, whole model, one table (`python -m
llama_surgery_jax.speed --decode ...` prints it).

Each row is one (context, batch) on a cache of random contents (what a step reads costs the same whatever the
prompt was, and a 128k prefill per row would cost more device time than the decode it measures), bf16:

- dense, three attentions: "kernel", flash-decoding (`dense_decode_attention`: split-K over the written blocks,
  GQA-native); "cudnn", jax's cuDNN attention with the lengths as a padding mask; "masked", XLA's masked softmax
  over every slot of the cache (the model's float32 path);
- surgery: block routing at each ρ, `sparse_decode_attention` over the listed blocks.

Times: "step" is one jitted call per token, the next token's argmax dispatched from the host between calls (the
host launches step t + 1 while step t runs; surgery runs the step that routes or the one that does not, as the
host's lengths say); "loop" is greedy decode in device loops: dense all steps in one `greedy_decode` program,
surgery the runs of `inference.cache.greedy_plan` (a step that routes alone, the steps between in programs of
32, 4 and 1 steps that do not route). The speedup is
surgery's against the fastest dense attention of the same (context, batch) and timing. KV bytes read per step:
every written slot (dense kernel and cuDNN; the masked attention reads the whole cache) or the listed blocks of
the budget's row (surgery; for a row router, whose union grows through its block, the count at the block's end:
an upper bound). `profile` rows: a trace of a few steps, the device's busy time and the source lines
that took it (`profiling.profile`).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama_surgery_jax.evaluation.prefill_speed import dense_and_routed, program_memory_gib
from llama_surgery_jax.inference.cache import (
    PLAIN_RUNS,
    KVCache,
    decode_step,
    greedy_decode,
    greedy_plan,
    init_cache,
    kept_rows,
)
from llama_surgery_jax.model.llama import LlamaForCausalLM
from llama_surgery_jax.surgery.block_routing import floor_density
from llama_surgery_jax.surgery.routed_attention import routed_layers

DENSE_ATTENTIONS = {"kernel": "kernel", "cudnn": "cudnn", "masked": None}  # name → dense_attention's `attention`


def random_cache(model: LlamaForCausalLM, batch: int, context: int, steps: int, seed: int = 0) -> KVCache:
    """A cache of `context` written tokens per sequence (and room for `steps` more) holding random K, V, block codes
    (row routing: key blocks' routes) and router inputs."""
    layers = []
    for index, layer in enumerate(init_cache(model, batch, context + steps)):
        keys = jax.random.split(jax.random.key(seed + index), 4)
        k, v = (jax.random.normal(key, layer.k.shape, layer.k.dtype) for key in keys[:2])
        codes = ring = None
        if layer.codes is not None:
            config = routed_layers(model)[index].config
            if config.query == "row":  # key blocks' soft routes: a distribution over c children per level
                codes = jax.nn.softmax(jax.random.normal(keys[2], layer.codes.shape), axis=-1).astype(layer.codes.dtype)
            else:
                codes = jax.random.randint(keys[2], layer.codes.shape, 0, config.p**config.levels, jnp.int32)
            ring = jax.random.normal(keys[3], layer.router_inputs.shape, layer.router_inputs.dtype)
        layers.append(layer._replace(k=k, v=v, codes=codes, router_inputs=ring))
    return KVCache(tuple(layers), jnp.full((batch,), context, jnp.int32))


def _programs(graphdef, state, cache, tokens, density, attention, routed: bool) -> dict:
    """{route: one compiled step (state, cache, tokens, ρ) → (logits, cache)}: for surgery a step that routes and
    one that does not (the host knows which is due), for dense one step."""
    def step(state, cache, tokens, density, route):
        return decode_step(nnx.merge(graphdef, state), cache, tokens, block_density=density, attention=attention,
                           route=route)[:2]

    return {route: jax.jit(step, donate_argnums=(1,), static_argnums=(4,)).lower(state, cache, tokens, density,
                                                                                 route).compile()
            for route in ((True, False) if routed else (None,))}


def _loop(graphdef, state, cache, tokens, density, attention, steps: int, tile: int, routed: bool):
    """(cache, tokens) → (the last new tokens, cache) after `steps` greedy tokens decoded in device loops: one
    `greedy_decode` program (dense), or the runs of `greedy_plan` (surgery), every program compiled here."""
    def compiled(route, n):
        def run(state, cache, tokens, density):
            return greedy_decode(nnx.merge(graphdef, state), cache, tokens, n, block_density=density,
                                 attention=attention, route=route)

        return jax.jit(run, donate_argnums=(1,)).lower(state, cache, tokens, density).compile()

    runs = [(True, 1)] + [(False, n) for n in PLAIN_RUNS] if routed else [(None, steps)]
    programs = {run: compiled(*run) for run in runs}

    def decode(cache, tokens):
        plan = [(None, steps)]
        if routed:
            plan = greedy_plan(np.asarray(cache.lengths), np.asarray(kept_rows(cache)), steps, tile)
        for run in plan:
            new, cache = programs[run](state, cache, tokens, density)
            tokens = new[:, -1]
        return tokens, cache

    return decode


def _due(one: dict, cache: KVCache, tile: int):
    """The host's routing decision for each coming step, without reading the device: the lengths advance by one a
    step from their value now, and the selection kept is stale only before the first step."""
    if None in one:
        return lambda step: None
    import numpy as np

    from llama_surgery_jax.inference.cache import routing_due

    lengths = np.asarray(cache.lengths)
    rows = np.asarray(kept_rows(cache))
    return lambda step: bool(np.any(routing_due(lengths + step, rows if step == 0 else (lengths + step) // tile,
                                                tile)))


def _time_steps(one: dict, due, state, cache, tokens, density, steps: int):
    """Seconds per step of `steps` host-dispatched steps after a warm-up one → (seconds, cache)."""
    logits, cache = jax.block_until_ready(one[due(0)](state, cache, tokens, density))
    start = time.perf_counter()
    for step in range(1, steps + 1):
        logits, cache = one[due(step)](state, cache, jnp.argmax(logits, -1).astype(jnp.int32), density)
    jax.block_until_ready(logits)
    return (time.perf_counter() - start) / steps, cache


def _profile_steps(one: dict, due, first: int, state, cache, tokens, density, runs: int):
    """`profiling.profile` of `runs` steps from step `first` → (the summary, cache)."""
    from llama_surgery_jax.evaluation.profiling import profile

    carried = {"cache": cache, "step": first}

    def run():
        program = one[due(carried["step"])]
        logits, carried["cache"] = program(state, carried["cache"], tokens, density)
        carried["step"] += 1
        return logits

    try:
        summary = profile(run, one[due(first)].as_text(), runs=runs)
    except Exception as error:  # noqa: BLE001 — a machine without a working profiler still gets its timings
        summary = {"error": f"{type(error).__name__}: {error}"}
    return summary, carried["cache"]


def decode_rows(model: LlamaForCausalLM, described: str, settings, densities, steps: int, *,
                dense=("kernel", "cudnn", "masked"), loop: bool = False, profile_steps: int = 0, seed: int = 0):
    """Rows of the decode table per (context, batch): each dense attention, then surgery at each ρ (module
    docstring). A dense attention that does not compile here (cuDNN's) gives a row with its error."""
    (dense_def, dense_state), (routed_def, routed_state) = dense_and_routed(model)
    config = model.config
    layer = routed_layers(model)[0]
    tile = layer.config.block_size
    slot_bytes = config.num_key_value_heads * config.head_dim * 2 * 2  # k and v, bf16
    for context, _ in settings:  # a budget below the forced tiles would execute more than the ρ the table prints
        floor = floor_density(-(-context // tile), tile=tile, window=layer.config.window, sink=layer.config.sink)
        if min(densities) < floor:
            raise ValueError(f"block density {min(densities)} is below the floor {floor:.3f} at context {context} "
                             f"(tile {tile}, window {layer.config.window}: the sink, own and window tiles alone "
                             "execute that much); ask for a density at or above it, or a longer context")
    variants = [("dense", name, dense_def, dense_state, 1.0) for name in dense]
    variants += [("surgery", "kernel", routed_def, routed_state, density) for density in densities]
    for context, batch in settings:
        for kind, attention, graphdef, state, density in variants:
            row = {"kind": "decode", "model": described, "context": context, "batch": batch, "attention": kind,
                   "decode_attention": attention, "density": density}
            # One cache serves every phase: the step loop, the profile, the program loop's warm-up and its run.
            cache = random_cache(model, batch, context, steps + 1 + profile_steps + (2 * steps if loop else 0), seed)
            slots = cache.layers[0].k.shape[1]
            tokens = jax.random.randint(jax.random.key(seed), (batch,), 0, config.vocab_size)
            rho = jnp.float32(density)
            backend = DENSE_ATTENTIONS[attention] if kind == "dense" else "kernel"
            # A row router routes at every step (each row its own query): one program, as dense; a block router has
            # steps that route and steps that only attend.
            skips_routing = kind == "surgery" and layer.config.query != "row"
            try:
                one = _programs(graphdef, state, cache, tokens, rho, backend, skips_routing)
            except Exception as error:  # noqa: BLE001 — a peer that does not run here is a row that says so
                if attention != "cudnn":
                    raise
                yield row | {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"}
                continue
            due = _due(one, cache, tile)
            seconds, cache = _time_steps(one, due, state, cache, tokens, rho, steps)
            row |= {"step_ms": 1e3 * seconds, "tokens_per_s": batch / seconds,
                    "memory_gib": max(program_memory_gib(program) for program in one.values())}
            if profile_steps:
                row["profile"], cache = _profile_steps(one, due, steps + 1, state, cache, tokens, rho, profile_steps)
            if loop:
                decode = _loop(graphdef, state, cache, tokens, rho, backend, steps, tile, skips_routing)
                _, cache = jax.block_until_ready(decode(cache, tokens))  # warm-up
                start = time.perf_counter()
                _, cache = jax.block_until_ready(decode(cache, tokens))
                row["loop_step_ms"] = 1e3 * (time.perf_counter() - start) / steps
            if kind == "dense":
                read = (context if attention != "masked" else slots) * slot_bytes * batch * config.num_hidden_layers
            else:
                blocks = int(jnp.sum(layer.row_budgets(slots // tile, density)[:, context // tile]))
                read = blocks * tile * slot_bytes / config.num_key_value_heads * batch * config.num_hidden_layers
            row["kv_gib_read_per_step"] = read / 2**30
            yield row
            del cache, one, due


def decode_cells(r: dict, rows: list[dict]) -> list[str]:
    """One row of the decode table; speedups against the fastest dense attention of the same setting."""
    setting = (r["model"], r["context"], r["batch"])
    attention = r["attention"] + (f", {r['decode_attention']}" if r["attention"] == "dense" else "")
    head = [r["model"], str(r["context"]), str(r["batch"]), attention, str(r["density"])]
    if "error" in r:
        return head + [r["error"]] + [""] * 6

    def best_dense(key):
        times = [o[key] for o in rows if o["kind"] == "decode" and o["attention"] == "dense" and key in o
                 and (o["model"], o["context"], o["batch"]) == setting]
        return min(times) if times else float("nan")

    loop = r.get("loop_step_ms")
    return head + [f"{r['step_ms']:.2f}", f"{r['tokens_per_s']:.1f}", f"{best_dense('step_ms') / r['step_ms']:.2f}×",
                   f"{loop:.2f}" if loop else "", f"{best_dense('loop_step_ms') / loop:.2f}×" if loop else "",
                   f"{r['kv_gib_read_per_step']:.2f}", f"{r['memory_gib']:.1f}"]


DECODE_HEADER = ["model", "context", "batch", "attention", "ρ", "step ms", "tokens/s", "× fastest dense",
                 "loop step ms", "loop × fastest dense", "KV GiB read per step", "memory GiB"]


def profile_lines(rows: list[dict]) -> list[str]:
    """A short section per profiled row: wall and busy time per step, then where the busy time went."""
    lines = []
    for r in rows:
        if "profile" not in r:
            continue
        p = r["profile"]
        if "error" in p:
            lines += [f"Profile of {r['model']}, context {r['context']}: {p['error']}", ""]
            continue
        lines += [f"Profile: {r['model']}, context {r['context']} × {r['batch']}, {r['attention']} "
                  f"{r['decode_attention'] if r['attention'] == 'dense' else r['density']}: wall {p['wall_ms']:.2f} ms "
                  f"per step, device busy {p['busy_ms']:.2f} ms in {p['kernels']:.0f} kernels", "",
                  "| source line | ms per step | kernels |", "| --- | --- | --- |"]
        lines += [f"| `{g['op']}` | {g['ms']:.3f} | {g['count']:.0f} |" for g in p["groups"]] + [""]
    return lines
