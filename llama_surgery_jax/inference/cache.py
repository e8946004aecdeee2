"""Inference with a KV cache: routed prefill, then token-by-token decode that reads only visible keys.

    logits, cache = prefill(model, tokens, lengths, max_len=S, attention="auto")   # one pass over the prompts
    logits, cache = decode_step(model, cache, next_tokens, budget=M)              # one new token per sequence

The cache holds, per layer, K and V of every written token and, for routed layers, each token's prefix
codes per routing head (METHOD.md §4). Routing is per token and causal, so a new token's codes come
from its own router on its own attention input x, and query i sees cached key j iff

    j <= i  and  (codes[i] == codes[j]  or  (sink and j == 0)  or  i - j <= window  or  i == j)

(`topology.token_mask`'s rule). Block-mode routers (`RouterConfig.mode="block"`) route a block of T tokens
from the mean of the T router inputs that end at its first token (`router.pooled_block_features`): the
cache keeps those inputs for the last T positions (a ring per layer), a token that opens a block routes
it, and the block's other tokens take its code from the cache. Prompts of different lengths are
right-padded: position = index, and a padding slot is never visible (causality hides it from the prompt;
decode overwrites it before any query can see it, because sequence b writes its next token at index
lengths[b]).

Prefill attention (`attention`): "reference" runs the chunked masked attention of the training path
(float32, any head size); "kernel" runs `pallas_kernels.token_routed_attention` (sorted buckets plus the
sink/window band, exact token-level routing; bf16/fp16, head_dim 64 or 128: float32 inputs are cast to
bf16) and, for dense layers, `jax.nn.dot_product_attention` (cuDNN flash attention on GPU); "auto" is
"kernel" on a GPU when the shapes allow it, else "reference".

Decode attention: budget=None attends over the whole cache with the mask (reads every key); budget=M
gathers, per (sequence, routing head), the first M visible keys and attends over those alone (reads M
keys). If a head sees more than M keys the step reports `overflow` and the caller repeats it with a
larger budget (`decode_step_auto`), so the result never depends on the budget.

Shapes: b batch, t tokens, S cache slots, h query heads, k KV heads, r routing heads, d head dim.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from llama_surgery_jax.model.llama import LlamaForCausalLM, dense_attention, rope_cos_sin
from llama_surgery_jax.surgery.config import RouterConfig
from llama_surgery_jax.surgery.reference_attention import attend, masked_attention
from llama_surgery_jax.surgery.routed_attention import RoutedAttention, routed_layers
from llama_surgery_jax.surgery.router import route

ATTENTION_CHOICES = ("auto", "reference", "kernel")
KERNEL_HEAD_DIMS = (64, 128)


class ContextError(ValueError):
    """Prompts (plus the tokens to generate) that do not fit the model's context, or empty prompts."""


class KVCache(NamedTuple):
    """k, v: [layers, b, S, k, d] in the compute dtype; codes: [layers, b, r, S] int32 (None for a dense
    model); lengths: [b] int32, tokens written per sequence (the next token goes to index lengths[b]);
    router_inputs: block-mode routers only, [layers, b, T, hidden]: the router input of position p at
    slot p mod T, for the last T positions."""

    k: jax.Array
    v: jax.Array
    codes: jax.Array | None
    lengths: jax.Array
    router_inputs: jax.Array | None = None


def router_config(model: LlamaForCausalLM) -> RouterConfig | None:
    """The routers' config (the same in every layer), or None for a dense model."""
    layers = routed_layers(model)
    return layers[0].config if layers else None


def resolve_attention(attention: str, model: LlamaForCausalLM) -> str:
    """'auto' → 'kernel' on a GPU with a kernel head size, else 'reference'."""
    if attention not in ATTENTION_CHOICES:
        raise ValueError(f"attention must be one of {ATTENTION_CHOICES}, got {attention!r}")
    if attention != "auto":
        return attention
    on_gpu = jax.default_backend() == "gpu"
    return "kernel" if on_gpu and model.config.head_dim in KERNEL_HEAD_DIMS else "reference"


def check_context(lengths, max_new_tokens: int, context: int) -> int:
    """lengths: prompt lengths → cache slots S = max prompt + max_new_tokens; raises ContextError."""
    lengths = [int(n) for n in lengths]
    if not lengths:
        raise ContextError("no prompts given")
    empty = [i for i, n in enumerate(lengths) if n == 0]
    if empty:
        raise ContextError(f"prompt(s) {empty} are empty: every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ContextError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    needed = max(lengths) + max_new_tokens
    if needed > context:
        raise ContextError(f"the longest prompt ({max(lengths)} tokens) plus {max_new_tokens} new tokens "
                           f"needs {needed} positions; the model's context is {context}")
    return needed


def kernel_routed_attention(q, k, v, codes, config: RouterConfig) -> jax.Array:
    """The block-sparse kernel (sorted buckets + band), exact token routing. Shapes as `masked_attention`."""
    from pallas_kernels import token_routed_attention

    low = q.dtype if q.dtype in (jnp.bfloat16, jnp.float16) else jnp.bfloat16
    out = token_routed_attention(q.astype(low), k.astype(low), v.astype(low), codes,
                                 tile=config.block_size, window=config.window, sink=config.sink)
    return out.astype(q.dtype)


def kernel_dense_attention(q, k, v) -> jax.Array:
    """The best dense causal kernel jax offers (cuDNN flash attention on GPU), GQA native."""
    low = q.dtype if q.dtype in (jnp.bfloat16, jnp.float16) else jnp.bfloat16
    out = jax.nn.dot_product_attention(q.astype(low), k.astype(low), v.astype(low), is_causal=True)
    return out.astype(q.dtype)


def _layer_tail(layer, x, out):
    """The decoder layer after attention (as `LlamaDecoderLayer.__call__`): o_proj, residuals, MLP."""
    b, t = out.shape[:2]
    x = x + layer.self_attn.o_proj(out.reshape(b, t, -1))
    return x + layer.mlp(layer.post_attention_layernorm(x))


def prefill(model: LlamaForCausalLM, tokens: jax.Array, lengths: jax.Array, *, max_len: int,
            attention: str = "reference") -> tuple[jax.Array, KVCache]:
    """tokens: [b, t] int (right-padded), lengths: [b] int → logits [b, t, vocab] float32, KVCache of S = max_len.

    attention: "reference" or "kernel" (resolved, see the module docstring). Non-routed attention
    implementations other than dense (the baselines) run as they are, through their attention_impl.
    """
    b, t = tokens.shape
    config = router_config(model)
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    cos, sin = rope_cos_sin(model.config, positions)
    x = model.model.embed_tokens(tokens).astype(model.precision.compute)
    ks, vs, codes_per_layer, rings = [], [], [], []
    block = config is not None and config.mode == "block"
    for layer in model.model.layers:
        h = layer.input_layernorm(x)
        q, k, v = layer.self_attn.project(h, cos, sin)
        impl = layer.self_attn.attention_impl
        if block:
            rings.append(last_positions_ring(h, jnp.asarray(lengths), config.block_size))
        if isinstance(impl, RoutedAttention):
            codes = impl.router(h).codes  # argmax routes, no noise: evaluation
            if attention == "kernel":
                out = kernel_routed_attention(q, k, v, codes, config)
            else:
                out = masked_attention(q, k, v, codes, None, config=config)[0]
            codes_per_layer.append(jnp.pad(codes, ((0, 0), (0, 0), (0, max_len - t)), constant_values=-1))
        elif attention == "kernel" and impl is dense_attention:
            out = kernel_dense_attention(q, k, v)
        else:
            out = impl(q, k, v, x=h)[0]
        x = _layer_tail(layer, x, out)
        pad = ((0, 0), (0, max_len - t), (0, 0), (0, 0))
        ks.append(jnp.pad(k, pad))
        vs.append(jnp.pad(v, pad))
    logits = model.logits(model.model.norm(x))
    codes = jnp.stack(codes_per_layer) if config is not None else None
    ring = jnp.stack(rings) if block else None
    return logits, KVCache(jnp.stack(ks), jnp.stack(vs), codes, jnp.asarray(lengths, jnp.int32), ring)


def last_positions_ring(h: jax.Array, lengths: jax.Array, size: int) -> jax.Array:
    """h: [b, t, hidden], lengths: [b] → [b, size, hidden]: slot s holds h at the position p ≡ s (mod size)
    among the last `size` positions before lengths[b] (zeros where p < 0)."""
    slots = jnp.arange(size)
    first = lengths[:, None] - size
    positions = first + (slots[None, :] - first) % size  # [b, size], in [lengths - size, lengths)
    taken = jnp.take_along_axis(h, jnp.clip(positions, 0)[..., None], axis=1)
    return jnp.where((positions >= 0)[..., None], taken, 0).astype(h.dtype)


def decode_block_codes(router, config: RouterConfig, ring: jax.Array, cached_codes: jax.Array,
                       lengths: jax.Array) -> jax.Array:
    """A block-mode router's codes [b, r] for the token at index lengths[b], whose input is already in the ring.

    The first token of block n = p // T routes it from the mean of the T inputs ending at p (as
    `router.pooled_block_features`, same order of summation); any other token takes block n's code,
    written in the cache at index n · T.
    """
    size = config.block_size
    positions = lengths[:, None] - jnp.arange(size)[None, :]  # p, p − 1, …, p − T + 1
    window = jnp.take_along_axis(ring, (positions % size)[..., None], axis=1).astype(jnp.float32)
    valid = positions >= 0
    features = (jnp.sum(jnp.where(valid[..., None], window, 0.0), axis=1)
                / jnp.sum(valid, axis=1)[:, None].astype(jnp.float32))
    fresh = route(router.parameters(), features[:, None], config=dataclasses.replace(config, mode="token"),
                  routing_heads=router.routing_heads).codes[:, :, 0]
    batch = jnp.arange(lengths.shape[0])
    opened = cached_codes[batch, :, (lengths // size) * size]  # [b, r]
    return jnp.where((lengths % size == 0)[:, None], fresh, opened)


def decode_visibility(cached_codes: jax.Array | None, new_codes: jax.Array | None, lengths: jax.Array,
                      slots: int, config: RouterConfig | None) -> jax.Array:
    """Which cache slots the new token (at index lengths[b]) sees.

    cached_codes: [b, r, S] (the new token's already written), new_codes: [b, r] → bool [b, r, S];
    dense (config None): [b, 1, S], the causal slots.
    """
    j = jnp.arange(slots)[None, None, :]
    i = lengths[:, None, None]
    causal = j <= i
    if config is None:
        return causal
    visible = (cached_codes == new_codes[..., None]) | (j == i)
    if config.sink:
        visible = visible | (j == 0)
    if config.window is not None:
        visible = visible | (i - j <= config.window)
    return visible & causal


def gathered_attention(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array,
                       budget: int) -> tuple[jax.Array, jax.Array]:
    """One query per sequence over at most `budget` visible keys per routing head, gathered from the cache.

    q: [b, h, d]; k, v: [b, S, k, d]; visible: bool [b, r, S] with r = h or k → (out [b, h, d], the most
    keys any (sequence, routing head) sees: int32 scalar; out is exact only when it is <= budget).
    """
    b, heads, d = q.shape
    kv_heads = k.shape[2]
    r = visible.shape[1]
    kv_of_r = jnp.arange(r) // (r // kv_heads)  # r = h: head h reads KV head h // group; r = k: itself
    # The first `budget` visible slots in position order, compacted by a prefix sum: O(S), no sort.
    count = jnp.sum(visible, axis=-1, dtype=jnp.int32)  # [b, r]
    rank = jnp.cumsum(visible, axis=-1, dtype=jnp.int32) - 1
    target = jnp.where(visible, rank, budget)  # invisible slots, and visible ones past the budget, drop
    batch = jnp.arange(b)[:, None, None]
    heads_r = jnp.arange(r)[None, :, None]
    slot_ids = jnp.broadcast_to(jnp.arange(visible.shape[-1], dtype=jnp.int32), visible.shape)
    slots = jnp.zeros((b, r, budget), jnp.int32).at[batch, heads_r, target].set(slot_ids, mode="drop")
    valid = jnp.arange(budget)[None, None, :] < count[..., None]
    k_sel = k[batch, slots, kv_of_r[None, :, None]]  # [b, r, M, d]: only these rows are read
    v_sel = v[batch, slots, kv_of_r[None, :, None]]
    qr = q.reshape(b, r, heads // r, d)
    scores = jnp.einsum("brgd,brmd->brgm", qr, k_sel, preferred_element_type=jnp.float32) / math.sqrt(d)
    scores = jnp.where(valid[:, :, None, :], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("brgm,brmd->brgd", probs.astype(v.dtype), v_sel, preferred_element_type=jnp.float32)
    most = jnp.max(count)
    return out.reshape(b, heads, d).astype(q.dtype), most


def decode_step(model: LlamaForCausalLM, cache: KVCache, tokens: jax.Array, *,
                budget: int | None = None) -> tuple[jax.Array, KVCache, jax.Array]:
    """tokens: [b] int, the next token of each sequence → (logits [b, vocab] float32, cache, overflow).

    budget None: masked attention over every cache slot. budget M: only the first M visible keys per
    (sequence, routing head) are read; overflow (bool scalar) says some head saw more, and the step must
    be repeated with a larger budget. Dense models read the causal prefix.
    """
    b = tokens.shape[0]
    config = router_config(model)
    slots = cache.k.shape[2]
    lengths = cache.lengths
    cos, sin = rope_cos_sin(model.config, lengths[:, None])
    x = model.model.embed_tokens(tokens[:, None]).astype(model.precision.compute)
    batch = jnp.arange(b)
    # Written in place, one slot per layer (the cache is donated by `Decoder`): a step never copies it.
    k_all, v_all, codes_all, ring_all = cache.k, cache.v, cache.codes, cache.router_inputs
    block = config is not None and config.mode == "block"
    overflow = jnp.zeros((), bool)
    for index, layer in enumerate(model.model.layers):
        h = layer.input_layernorm(x)
        q, k, v = layer.self_attn.project(h, cos, sin)  # [b, 1, heads or kv, d]
        k_all = k_all.at[index, batch, lengths].set(k[:, 0])
        v_all = v_all.at[index, batch, lengths].set(v[:, 0])
        k_cache, v_cache = k_all[index], v_all[index]
        impl = layer.self_attn.attention_impl
        if block:
            ring_all = ring_all.at[index, batch, lengths % config.block_size].set(h[:, 0])
        if isinstance(impl, RoutedAttention):
            if block:
                new_codes = decode_block_codes(impl.router, config, ring_all[index], codes_all[index], lengths)
            else:
                new_codes = impl.router(h).codes[:, :, 0]  # [b, r]: its own router on its own x
            codes_all = codes_all.at[index, batch, :, lengths].set(new_codes)
            visible = decode_visibility(codes_all[index], new_codes, lengths, slots, config)
        elif impl is dense_attention:  # the same causal slots for every KV head
            visible = jnp.broadcast_to(decode_visibility(None, None, lengths, slots, None), (b, k.shape[2], slots))
        else:
            raise NotImplementedError(f"KV-cache decoding of attention {type(impl).__name__}")
        if budget is None:
            out = attend(q, k_cache, v_cache, visible[:, :, None, :])
        else:
            out, most = gathered_attention(q[:, 0], k_cache, v_cache, visible, budget)
            overflow = overflow | (most > budget)
            out = out[:, None]
        x = _layer_tail(layer, x, out)
    logits = model.logits(model.model.norm(x))[:, 0]
    return logits, KVCache(k_all, v_all, codes_all, lengths + 1, ring_all), overflow


class Decoder:
    """Jitted prefill and decode steps for one model (split once; one compile per shape and budget).

    `budget_step` is the gather granularity: budgets are multiples of it (fewer recompiles), starting
    at `initial_budget` and doubling on overflow. gather=False (and dense models): masked decode over the
    whole cache.
    """

    def __init__(self, model: LlamaForCausalLM, *, attention: str = "auto", gather: bool = True,
                 budget_step: int = 128, initial_budget: int | None = None):
        self.graphdef, self.state = nnx.split(model)
        self.attention = resolve_attention(attention, model)
        self.routed = router_config(model) is not None
        self.gather = gather
        self.budget_step = budget_step
        self.budget = initial_budget
        self.compile_s = 0.0
        graphdef = self.graphdef

        def prefill_fn(state, tokens, lengths, max_len):
            return prefill(nnx.merge(graphdef, state), tokens, lengths, max_len=max_len, attention=self.attention)

        def decode_fn(state, cache, tokens, budget):
            return decode_step(nnx.merge(graphdef, state), cache, tokens, budget=budget)

        self._prefill = jax.jit(prefill_fn, static_argnums=(3,))
        self._decode = jax.jit(decode_fn, static_argnums=(3,), donate_argnums=(1,))

    def prefill(self, tokens: jax.Array, lengths: jax.Array, max_len: int) -> tuple[jax.Array, KVCache]:
        """tokens: [b, t], lengths: [b] → logits [b, t, vocab], cache of max_len slots."""
        return self._prefill(self.state, tokens, lengths, max_len)

    def step(self, cache: KVCache, tokens: jax.Array) -> tuple[jax.Array, KVCache]:
        """tokens: [b] → logits [b, vocab], cache; repeats the step with a doubled budget on overflow."""
        slots = cache.k.shape[2]
        if not self.gather or not self.routed:  # dense decode sees the whole causal prefix: no gather
            logits, cache, _ = self._decode(self.state, cache, tokens, None)
            return logits, cache
        if self.budget is None:
            self.budget = min(slots, self.budget_step)
        while True:
            logits, new_cache, overflow = self._decode(self.state, cache, tokens, self.budget)
            if not bool(overflow):
                return logits, new_cache
            # Slots before the new token are intact (it wrote only its own slot, which the repeat
            # overwrites): step back and repeat with twice the budget.
            cache = new_cache._replace(lengths=new_cache.lengths - 1)
            self.budget = min(slots, 2 * self.budget)
