"""One surgery training step per row (reference vs kernel path): time and peak memory, each row in a fresh process.

The command line, its options and protocol: `python -m llama_surgery_jax.step_bench` (llama_surgery_jax/step_bench.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import optax
from flax import nnx

from llama_surgery_jax.model.config import ModelConfig, Precision
from llama_surgery_jax.surgery.config import RouterConfig, RouterExecution, RouterSchedule

MODELS = ("smollm2-135m", "llama-3.1-8b")
LENGTHS = (4096, 8192, 16384)
# kernel: the kernels with the chunked JAX router gradient; kernel-fused: the router gradient inside the
# backward kernels (RouterExecution.router_gradient).
BACKENDS = ("reference", "kernel", "kernel-fused")
TINY = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=1, head_dim=64, rms_norm_eps=1e-5,
                   rope_theta=10000.0, max_position_embeddings=1024, tie_word_embeddings=False, name="tiny-d64")
TINY_LENGTHS = (64, 128)


def model_config(name: str) -> ModelConfig:
    return TINY if name == TINY.name else ModelConfig.named(name)


def router_config(tiny: bool, backend: str) -> tuple[RouterConfig, RouterExecution]:
    """The default router (L = 13, d_max = 6, window 128, tile 128); tiles and chunks of 16 / 32 when tiny."""
    paths = dict(attention_backend=backend.removesuffix("-fused"),
                 router_gradient="fused" if backend.endswith("-fused") else "chunked")
    if tiny:
        return RouterConfig(levels=6, d_max=2, window=8, block_size=16), RouterExecution(query_chunk=32, **paths)
    return RouterConfig(), RouterExecution(**paths)


def run_row(model_name: str, tokens_count: int, backend: str, *, dtype: str, init: str, repeats: int,
            remat: bool = False, seed: int = 0) -> dict:
    """Builds the model, compiles the step once, times `repeats` steps → one result row (a dict)."""
    from llama_surgery_jax.model.llama import LlamaForCausalLM
    from llama_surgery_jax.surgery.routed_attention import inject_routers
    from llama_surgery_jax.surgery.router import RouterParam
    from llama_surgery_jax.training.loop import make_train_step

    config = model_config(model_name)
    router, execution = router_config(model_name == TINY.name, backend)
    model = LlamaForCausalLM(config, precision=Precision(dtype, dtype), rngs=nnx.Rngs(seed))
    inject_routers(model, router, nnx.Rngs(seed + 1), homotopy=init == "homotopy", execution=execution)
    graphdef, routers, frozen = nnx.split(model, RouterParam, ...)
    del model
    optimizer = optax.adamw(1e-3)
    opt_state = optimizer.init(routers)
    tokens = jax.random.randint(jax.random.key(seed + 2), (1, tokens_count), 0, config.vocab_size)
    step = jax.jit(make_train_step(graphdef, RouterSchedule(), optimizer, remat=remat), donate_argnums=(0, 1))
    compiled = step.lower(routers, opt_state, frozen, tokens, 0, seed).compile()
    analysis = compiled.memory_analysis()
    times, first = [], None
    for i in range(repeats + 1):  # the first call warms up (allocations, autotuning)
        start = time.perf_counter()
        routers, opt_state, metrics = compiled(routers, opt_state, frozen, tokens, i, seed)
        jax.block_until_ready((routers, opt_state, metrics))
        times.append(time.perf_counter() - start)
        first = metrics if first is None else first  # loss and densities of the first step: same routers
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return {
        "model": model_name, "tokens": tokens_count, "backend": backend, "dtype": dtype, "init": init,
        "remat": remat, "ms": 1e3 * statistics.median(times[1:]) if repeats else None,
        "peak_gib": None if peak is None else peak / 2**30,
        "compiled_temp_gib": None if analysis is None else analysis.temp_size_in_bytes / 2**30,
        "loss": float(first["loss"]), "finite": bool(first["finite"]),
        "token_density": float(first["token_density"]), "block_density": float(first["block_density"]),
        "device": jax.devices()[0].device_kind, "router": dataclasses.asdict(router),
        "execution": dataclasses.asdict(execution),
    }


def run_in_subprocess(model_name: str, tokens_count: int, backend: str, args: argparse.Namespace) -> dict:
    """The row in a fresh process (its own peak memory; an OOM ends that process only)."""
    command = [sys.executable, "-m", "llama_surgery_jax.step_bench", "--row", f"{model_name}:{tokens_count}:{backend}",
               "--dtype", args.dtype, "--init", args.init, "--repeats", str(args.repeats)] + ["--remat"] * args.remat
    # JAX preallocates 75 % of the GPU by default; a training step at 16k may need more than that.
    env = {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.95", **os.environ}
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.row_timeout)
    except subprocess.TimeoutExpired:
        return {"model": model_name, "tokens": tokens_count, "backend": backend, "dtype": args.dtype,
                "init": args.init, "error": f"timed out after {args.row_timeout} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines:
        return json.loads(lines[-1])
    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    return {"model": model_name, "tokens": tokens_count, "backend": backend, "dtype": args.dtype, "init": args.init,
            "error": " | ".join(tail)}


def table(rows: list[dict]) -> str:
    def cell(row, key, fmt):
        value = row.get(key)
        return "-" if value is None else format(value, fmt)

    lines = ["| model | N | path | ms | peak GiB | compiled temp GiB | token density | block density | loss |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['model']} | {row['tokens']} | {row['backend']} | failed: {row['error'][:120]} "
                         "| | | | | |")
            continue
        lines.append(f"| {row['model']} | {row['tokens']} | {row['backend']} | {cell(row, 'ms', '.1f')} | "
                     f"{cell(row, 'peak_gib', '.2f')} | {cell(row, 'compiled_temp_gib', '.3g')} | "
                     f"{cell(row, 'token_density', '.3f')} | {cell(row, 'block_density', '.3f')} | "
                     f"{cell(row, 'loss', '.4f')} |")
    return "\n".join(lines)
