"""Baselines at a given block density, as `attention_impl`s of the same frozen model and pipeline.

The learned routing has to beat masks that cost nothing to learn, at the same number of computed tiles:

    streaming  static: the sink block, the diagonal block and the `extra` blocks just before it
               (StreamingLLM: attention sink + local window, at block granularity)
    moba       untrained content routing: the sink block, the diagonal block, and the `extra` earlier
               blocks whose mean-pooled key has the largest dot product with the query block's pooled
               query (MoBA-style gating), per query head

Both compute exactly min(qb + 1, extra + 2) tiles in query block row qb, so at equal `extra` their block
densities are equal, and `extra_blocks_for_density` picks `extra` for a target density (e.g. the
surgery's sorted block density). Inside a computed tile, attention is causal and otherwise dense.

Causality of the gate: a query block's pooled query is the mean of q over the `tile` tokens that end at
the block's FIRST token (fewer at the start), and only strictly earlier blocks compete, so which keys
token i sees never depends on a token after i (the diagonal block is causal token by token).

Shapes: b batch, t tokens, h query heads, k KV heads, d head dim, n = ceil(t / tile) blocks.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from llama_surgery_jax.model.llama import LlamaForCausalLM
from llama_surgery_jax.surgery.block_routing import causal_block_mean
from llama_surgery_jax.surgery.mask import causal_pairs
from llama_surgery_jax.surgery.reference_attention import tile_masked_attention
from llama_surgery_jax.surgery.routed_attention import remove_routers

BASELINES = ("streaming", "moba")


def tiles_per_row(num_tiles: int, extra: int) -> jax.Array:
    """[n] int: tiles computed in each query block row (sink + diagonal + extra, causal)."""
    return jnp.minimum(jnp.arange(num_tiles) + 1, extra + 2)


def baseline_block_density(num_tiles: int, extra: int) -> float:
    """Computed causal tiles / causal tiles of either baseline with `extra` blocks."""
    return float(jnp.sum(tiles_per_row(num_tiles, extra))) / causal_pairs(num_tiles)


def extra_blocks_for_density(num_tiles: int, density: float) -> int:
    """The `extra` whose block density is nearest to `density` (0 → sink + diagonal only)."""
    candidates = range(num_tiles)
    return min(candidates, key=lambda e: abs(baseline_block_density(num_tiles, e) - density))


def streaming_tiles(num_tiles: int, extra: int) -> jax.Array:
    """bool [n, n]: sink block, diagonal block and the `extra` blocks before it."""
    qb = jnp.arange(num_tiles)[:, None]
    kb = jnp.arange(num_tiles)[None, :]
    return ((kb == 0) | (qb - kb <= extra)) & (kb <= qb)


def moba_tiles(q: jax.Array, k: jax.Array, *, tile: int, extra: int) -> jax.Array:
    """q: [b, t, h, d], k: [b, t, k, d] → bool [b, h, n, n]: sink, diagonal and the top-`extra` earlier blocks."""
    b, t, heads, d = q.shape
    n = -(-t // tile)
    pad = n * tile - t
    k_blocks = jnp.pad(k.astype(jnp.float32), ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, n, tile, -1, d)
    counts = jnp.clip(t - jnp.arange(n) * tile, 1, tile).astype(jnp.float32)
    k_mean = jnp.sum(k_blocks, axis=2) / counts[None, :, None, None]  # [b, n, k, d]
    k_mean = jnp.repeat(k_mean, heads // k.shape[2], axis=2)  # the KV head of every query head
    gate = jnp.einsum("bqhd,bkhd->bhqk", causal_block_mean(q, tile), k_mean)
    qb = jnp.arange(n)[:, None]
    kb = jnp.arange(n)[None, :]
    candidates = (kb >= 1) & (kb < qb)  # strictly earlier, not the sink (always kept)
    gate = jnp.where(candidates, gate, -jnp.inf)
    chosen = jnp.zeros((b, heads, n, n), bool)
    if extra > 0:
        top = jax.lax.top_k(gate, min(extra, n))[1]  # [b, h, n, extra]
        picked = jax.nn.one_hot(top, n, dtype=bool).any(axis=-2) & candidates
        chosen = chosen | picked
    return chosen | ((kb == 0) | (kb == qb))


def baseline_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, x=None, kind: str, extra: int, tile: int,
                       mode: str = "train", cache=None, **_) -> tuple[jax.Array, dict, object]:
    """An `attention_impl` (`model.llama`'s contract): q: [b, t, h, d]; k, v: [b, t, k, d] → (out, aux, cache).

    aux: block_density (computed causal tiles / causal tiles) of the mask. Train and prefill only.
    """
    if mode == "decode":
        raise NotImplementedError(f"the {kind} baseline has no KV-cache decode; evaluate it by perplexity")
    t = q.shape[1]
    n = -(-t // tile)
    if kind == "streaming":
        tiles = streaming_tiles(n, extra)[None, None]
    elif kind == "moba":
        tiles = moba_tiles(q, k, tile=tile, extra=extra)
    else:
        raise ValueError(f"unknown baseline {kind!r}; choose one of {BASELINES}")
    out = tile_masked_attention(q, k, v, tiles, tile=tile)
    density = jnp.sum(tiles, dtype=jnp.float32) / (tiles.size // (n * n) * causal_pairs(n))
    return out, {"block_density": density}, cache


def install_baseline(model: LlamaForCausalLM, kind: str, *, extra: int, tile: int) -> LlamaForCausalLM:
    """Every layer runs baseline `kind` with `extra` blocks at `tile` (in place; routers removed)."""
    if kind not in BASELINES:
        raise ValueError(f"unknown baseline {kind!r}; choose one of {BASELINES}")
    remove_routers(model)
    impl = functools.partial(baseline_attention, kind=kind, extra=extra, tile=tile)
    for layer in model.model.layers:
        layer.self_attn.attention_impl = nnx.static(impl)
    return model


def describe(kind: str, extra: int, tile: int, tokens: int) -> dict:
    """What a baseline row of a table says about itself."""
    n = math.ceil(tokens / tile)
    return {"baseline": kind, "extra_blocks": extra, "tile": tile,
            "block_density": baseline_block_density(n, extra)}
