"""Token and block densities of the hard mask of random or initial routers on a real model and text.

Command line, options and protocol: `python -m llama_surgery_jax.density_report` (llama_surgery_jax/density_report.py).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from llama_surgery_jax.model.llama import dense_attention
from llama_surgery_jax.surgery.config import RouterConfig
from llama_surgery_jax.surgery.mask import (
    band_pass_tiles,
    block_density,
    bucket_tiles,
    causal_pairs,
    executed_tiles,
    tile_mask,
    token_density,
)
from llama_surgery_jax.surgery.router import (
    init_router_params,
    pooled_block_features,
    prefix_codes,
    router_logits,
    sample_routes,
)

PRIMES = (2, 3, 5, 7)
TILES = (64, 128)
N_REF = 8192


def attention_inputs(model, tokens: jax.Array) -> jax.Array:
    """tokens: [1, t] → [layers, t, hidden]: every layer's attention input in the dense model."""
    captured = []

    def capture(q, k, v, *, x, **kwargs):
        captured.append(x[0])
        return dense_attention(q, k, v, x=x, **kwargs)

    for layer in model.model.layers:
        layer.self_attn.attention_impl = capture
    try:
        model(tokens)
    finally:
        for layer in model.model.layers:
            layer.self_attn.attention_impl = dense_attention
    return jnp.stack(captured)


def layer_choices(params_per_layer, xs: jax.Array, *, heads: int, config: RouterConfig) -> jax.Array:
    """[layers, t, hidden] → argmax choices [layers, heads, t, levels], per token (token or block mode)."""

    @jax.jit
    def one(params, x):
        t = x.shape[0]
        features = x[None] if config.mode == "token" else pooled_block_features(x[None], config.block_size)
        logits = router_logits(params, features, routing_heads=heads, levels=config.levels, p=config.p)
        choices = sample_routes(logits, tau=1.0, rng=None, hard=True)[1][0]
        return choices if config.mode == "token" else jnp.repeat(choices, config.block_size, axis=1)[:, :t]

    return jnp.stack([one(params, x) for params, x in zip(params_per_layer, xs, strict=True)])


def densities(codes: jax.Array, config: RouterConfig) -> dict[str, float]:
    """codes: [layers, heads, t] → token density and, per tile, original and sorted block densities."""
    t = codes.shape[-1]
    heads = codes.size // t
    row = {"token_density": float(token_density(codes, window=config.window, sink=config.sink))}
    for tile in TILES:
        n = -(-t // tile)
        band = band_pass_tiles(codes, tile=tile, window=config.window, sink=config.sink)
        bucket = bucket_tiles(codes, tile=tile)
        row[f"tile{tile}_original"] = float(block_density(
            tile_mask(codes, tile=tile, window=config.window, sink=config.sink)))
        executed = jnp.sum(executed_tiles(codes, tile=tile, window=config.window, sink=config.sink))
        row[f"tile{tile}_sorted"] = float(executed / (heads * causal_pairs(n)))  # what the kernel runs
        row[f"tile{tile}_sorted_bucket_pass"] = float(block_density(bucket))
        # Band tiles holding a pair the bucket pass leaves (codes differ); the kernel runs every band tile.
        row[f"tile{tile}_band_pass_needed"] = float(block_density(band))
    return row


def block_mode_densities(choices_per_tile: dict[int, jax.Array], config: RouterConfig) -> dict[str, float]:
    """The block-level router with block = tile: its token density and its tile density at that tile."""
    row = {}
    for tile, choices in choices_per_tile.items():
        codes = prefix_codes(choices, p=config.p, prefix_levels=config.prefix_levels)
        row[f"block{tile}_token_density"] = float(token_density(codes, window=config.window,
                                                                sink=config.sink))
        row[f"block{tile}_tile_density"] = float(block_density(
            tile_mask(codes, tile=tile, window=config.window, sink=config.sink)))
    return row


def report(model, tokens: jax.Array, *, routing_heads: str = "query", seed: int = 0) -> list[dict]:
    """One row per (p, d_max, router init): the densities above; tokens: [1, t].

    At initialisation every code is 0 whatever d_max, so that router gets one row per p (d_max = L // 2).
    """
    xs = attention_inputs(model, tokens)
    layers, _, hidden = xs.shape
    mc = model.config
    heads = mc.num_attention_heads if routing_heads == "query" else mc.num_key_value_heads
    rows = []
    for p in PRIMES:
        base = RouterConfig.for_context(N_REF, p, routing_heads=routing_heads)
        for router in ("init", "random"):
            keys = jax.random.split(jax.random.key(seed), layers)
            params = [init_router_params(key, hidden, heads, base, homotopy=router == "init") for key in keys]
            choices = layer_choices(params, xs, heads=heads, config=base)
            block_choices = {tile: layer_choices(params, xs, heads=heads, config=dataclasses.replace(
                base, mode="block_prefix", block_size=tile)) for tile in TILES}
            for d_max in [base.d_max] if router == "init" else range(base.levels):
                config = dataclasses.replace(base, d_max=d_max)
                codes = prefix_codes(choices, p=p, prefix_levels=config.prefix_levels)
                row = {"p": p, "levels": config.levels, "d_max": d_max, "codes": config.num_codes,
                       "router": router, **densities(codes, config),
                       **block_mode_densities(block_choices, config)}
                rows.append(row)
                print(format_row(row), flush=True)
    return rows


HEADER = ("| p | L | d_max | p^k | router | token | tile64 orig | tile64 sorted | tile128 orig "
          "| tile128 sorted | block64 token | block64 tiles | block128 token | block128 tiles |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def format_row(row: dict) -> str:
    values = [row["token_density"], row["tile64_original"], row["tile64_sorted"], row["tile128_original"],
              row["tile128_sorted"], row["block64_token_density"], row["block64_tile_density"],
              row["block128_token_density"], row["block128_tile_density"]]
    return (f"| {row['p']} | {row['levels']} | {row['d_max']} | {row['codes']} | {row['router']} | "
            + " | ".join(f"{v:.3f}" for v in values) + " |")
