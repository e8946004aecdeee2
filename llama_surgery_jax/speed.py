"""Prefill speed of the surgery model against the dense model it came from, end to end, in one table.

    python -m llama_surgery_jax.speed [--models smollm2,llama-3.1-8b] [--lengths smollm2:8192,llama-3.1-8b:32768+131072]
        [--densities 0.1,0.2] [--tiles smollm2:64+128] [--reps 3] [--check-length 8192] [--run RUN] [--out DIR]

What a user runs: the whole prefill as one `jax.jit` per shape, bf16, batch 1, the KV cache written, and the
logits of the last position only (prefill needs no more; an 8B model's logits over a 128k prompt would be 67 GB).
Dense runs cuDNN flash attention; surgery runs, in every layer, router → block codes → the budget's tile mask
(`block_routing.select_by_depth`) → the schedule → `block_sparse_attention` (the Hopper kernel at tile 128, the
Triton one otherwise). The density is a traced argument: one compiled surgery program serves every ρ.

Models: `smollm2` is the embedded SmolLM2-135M-Instruct (its real weights) with the default preset's block
routers, random unless --run gives a trained block run; `llama-3.1-8b` is that config with random bf16 weights
and random block routers (tile 128, one route per KV head, W = 128). Prompts are random token ids: the budget
fixes the executed density whatever the text, and the table prints the density counted from the executed tiles.

Rows (`prefill`): median seconds of --reps runs after a warm-up, tokens/s, the speedup over dense, and the
compiled program's device memory (arguments + outputs + temporaries, XLA's memory analysis). Rows (`layer`):
one decoder layer's pieces on random inputs, × layers: the router (block features, codes, the budget's tiles),
the schedule, the sparse kernel (schedule included), dense cuDNN attention; the router and schedule as a
fraction of the sparse attention. Rows (`check`): at --check-length, the prefill on the kernels against the
evaluation forward on the reference attention (`tile_masked_attention`) replaying the same tiles: relative
error of the final hidden states and last logits, and whether the greedy next token agrees.
Rows (`decode`): decode tokens/s at --decode settings (context x batch), dense against surgery, per host-dispatched
step and (--decode-loop) in device loops, with KV bytes read per step and program memory; --profile-steps adds a
trace per row (`decode_speed`, `profiling`). Writes OUT/speed.json (rows as they finish) and OUT/speed.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from llama_surgery_jax.decode_speed import decode_rows
from llama_surgery_jax.inference.cache import init_cache, prefill
from llama_surgery_jax.model.config import ModelConfig, Precision
from llama_surgery_jax.model.llama import LlamaForCausalLM, dense_attention
from llama_surgery_jax.surgery.config import RouterConfig
from llama_surgery_jax.surgery.routed_attention import inject_routers, routed_layers
from llama_surgery_jax.surgery.router import route_blocks

BF16 = Precision("bfloat16", "bfloat16")
BF16_U = 2.0**-8
ROUTER_8B = RouterConfig(mode="block", d_max=0, p=2, levels=7, window=128, block_size=128, routing_heads="kv")


def default_router(tile: int) -> RouterConfig:
    """The default training preset's block router at another tile (its own is 64)."""
    from llama_surgery_jax.training.config import TrainConfig

    return dataclasses.replace(TrainConfig.preset("default").router, block_size=tile)


def build_model(name: str, tile: int, run: str | None, seed: int = 0) -> tuple[LlamaForCausalLM, str]:
    """(the model with routers, a description). The dense model is the same one without them."""
    if name == "smollm2":
        from llama_surgery_jax.model.checkpoint import load_model
        from llama_surgery_jax.model.embedded import default_model_dir

        model = load_model(default_model_dir(), BF16)
        if run:
            from llama_surgery_jax.training.checkpoints import load_trained_routers

            model, router, _ = load_trained_routers(model, run)
            return model, f"SmolLM2-135M, trained routers of {run} (tile {router.block_size})"
        inject_routers(model, default_router(tile), nnx.Rngs(seed + 1))
        return model, f"SmolLM2-135M, random routers (tile {tile})"
    config = ModelConfig.named(name)
    model = LlamaForCausalLM(config, precision=BF16, rngs=nnx.Rngs(seed))
    inject_routers(model, dataclasses.replace(ROUTER_8B, block_size=tile), nnx.Rngs(seed + 1))
    return model, f"{name}, random bf16 weights and routers (tile {tile})"


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
        def route(params, x, density, n=n):
            routing = route_blocks(params, x, config=router, routing_heads=heads)
            return layer.select("router", routing, None, None, None, layer.row_budgets(n, density), n)

        schedule = jax.jit(build_schedule)
        sparse = jax.jit(lambda q, k, v, tiles: block_sparse_attention(q, k, v, tiles, tile=router.block_size))
        dense = jax.jit(lambda q, k, v: dense_attention(q, k, v, attention="kernel")[0])
        dense_s, _ = median_seconds(dense, q, k, v, reps=reps)
        for density in densities:
            route_s, tiles = median_seconds(route, params, x, jnp.float32(density), reps=reps)
            schedule_s, _ = median_seconds(schedule, tiles, reps=reps)
            sparse_s, _ = median_seconds(sparse, q, k, v, tiles, reps=reps)
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


def prefill_cells(r: dict) -> list[str]:
    return [r["model"], str(r["length"]), r["attention"], f"{r['density']:.3f}", f"{r['seconds']:.4f}",
            f"{r['tokens_per_s']:.0f}", f"{r['speedup']:.2f}×", f"{r['memory_gib']:.1f}"]


def layer_cells(r: dict) -> list[str]:
    return [r["model"], str(r["length"]), str(r["density"]), f"{r['router_ms']:.2f}", f"{r['schedule_ms']:.2f}",
            f"{r['sparse_attention_ms']:.2f}", f"{r['dense_attention_ms']:.2f}", f"{r['attention_speedup']:.2f}×",
            f"{r['router_and_schedule_fraction']:.1%}"]


def check_cells(r: dict) -> list[str]:
    return [r["model"], str(r["length"]), str(r["density"]), f"{r['hidden_error']:.2e}", f"{r['logits_error']:.2e}",
            f"{r['bound']:.2e}", str(r["same_next_token"]), str(r["passed"])]


TABLES = (  # row kind, title, header, cells
    ("prefill", "# Prefill speed, dense against surgery ({device}, bf16, batch 1)",
     ["model", "tokens", "attention", "executed density", "prefill s", "tokens/s", "speedup", "memory GiB"],
     prefill_cells),
    ("layer", "One decoder layer's pieces on random inputs, × layers (ms):",
     ["model", "tokens", "ρ", "router", "schedule", "sparse attention", "dense attention", "attention speedup",
      "(router + schedule) / sparse attention"], layer_cells),
    ("check", "Kernel prefill against the reference evaluation forward on the same tiles:",
     ["model", "tokens", "ρ", "hidden rel. error", "last logits rel. error", "bound", "same next token", "passed"],
     check_cells),
)


def markdown(rows: list[dict], device: str) -> str:
    from llama_surgery_jax.decode_speed import DECODE_HEADER, decode_cells, profile_lines

    lines = []
    for kind, title, header, cells in TABLES:
        lines += [title.format(device=device), "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        lines += ["| " + " | ".join(cells(r)) + " |" for r in rows if r["kind"] == kind] + [""]
    lines += ["Decode, random cache contents, bf16, tokens/s of the whole batch (`llama_surgery_jax.decode_speed`):",
              "", "| " + " | ".join(DECODE_HEADER) + " |", "|" + " --- |" * len(DECODE_HEADER)]
    lines += ["| " + " | ".join(decode_cells(r, rows)) + " |" for r in rows if r["kind"] == "decode"] + [""]
    return "\n".join(lines + profile_lines(rows))


def per_model(text: str, cast) -> dict:
    """'smollm2:8192,llama-3.1-8b:32768+131072' → {'smollm2': [8192], 'llama-3.1-8b': [32768, 131072]}."""
    out = {}
    for item in filter(None, text.split(",")):
        name, _, values = item.partition(":")
        out[name] = [cast(v) for v in values.split("+") if v]
    return out


def decode_settings(text: str) -> dict:
    """'llama-3.1-8b:131072x1+32768x8' → {'llama-3.1-8b': [(131072, 1), (32768, 8)]}."""
    return per_model(text, lambda value: tuple(int(v) for v in value.split("x")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--models", default="smollm2,llama-3.1-8b")
    parser.add_argument("--lengths", type=lambda s: per_model(s, int),
                        default=per_model("smollm2:8192,llama-3.1-8b:32768+131072", int))
    parser.add_argument("--tiles", type=lambda s: per_model(s, int), default=per_model("smollm2:64+128", int),
                        help="router tiles per model (default: SmolLM2 at the preset's 64 and at 128; 8B at 128)")
    parser.add_argument("--densities", type=lambda s: [float(x) for x in s.split(",")], default=[0.1, 0.2])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--check-length", type=int, default=8192, help="0: no logits check")
    parser.add_argument("--decode", type=decode_settings, default=decode_settings("smollm2:8192x1,"
                                                                                  "llama-3.1-8b:131072x1+32768x8"),
                        help="decode settings per model, context x batch")
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--decode-dense", default="kernel,cudnn,masked",
                        help="dense decode attentions to time: kernel (flash-decoding), cudnn, masked (XLA)")
    parser.add_argument("--decode-loop", action="store_true",
                        help="also time the steps as one program (greedy_decode), without the host between steps")
    parser.add_argument("--profile-steps", type=int, default=0, help="trace this many decode steps per row")
    parser.add_argument("--skip", default="", help="comma list of sections to skip: prefill, layer, check, decode")
    parser.add_argument("--run", help="a trained block run: SmolLM2 with its routers instead of random ones")
    parser.add_argument("--out", default="speed")
    args = parser.parse_args(argv)
    if jax.default_backend() != "gpu":
        print("warning: no GPU; the kernels run in interpret mode and the numbers mean nothing", file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = jax.devices()[0].device_kind
    skip = set(filter(None, args.skip.split(",")))
    rows: list[dict] = []

    def add(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        (out / "speed.json").write_text(json.dumps({"device": device, "rows": rows}, indent=1))

    for name in filter(None, args.models.split(",")):
        tiles = [None] if (name == "smollm2" and args.run) else args.tiles.get(name, [128])
        for tile in tiles:
            model, described = build_model(name, tile or 128, args.run)
            lengths = args.lengths.get(name, [8192])
            if "check" not in skip and args.check_length:
                add(check_row(model, described, args.check_length, args.densities[0]))
            if "prefill" not in skip:
                for row in prefill_rows(model, described, lengths, args.densities, args.reps):
                    add(row)
            if "layer" not in skip:
                for row in layer_rows(model, described, lengths, args.densities, max(args.reps, 10)):
                    add(row)
            if "decode" not in skip:
                try:
                    for row in decode_rows(model, described, args.decode.get(name, []), args.densities,
                                           args.decode_steps, dense=args.decode_dense.split(","),
                                           loop=args.decode_loop, profile_steps=args.profile_steps):
                        add(row)
                except ValueError as error:
                    print(f"error: {error}", file=sys.stderr)
                    return 2
            del model
    (out / "speed.md").write_text(markdown(rows, device))
    print(markdown(rows, device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
