"""Llama in Flax NNX, with parameter names and layouts exactly as Hugging Face's.

One decoder layer serves every mode (as MaxText's `model_mode`):
    "train"    the whole sequence, no cache (training and perplexity);
    "prefill"  the whole prompt, and the layer's KV cache filled from it;
    "decode"   one new token per sequence against its cache.
Every attention layer computes q, k, v (RoPE applied), writes k and v to its cache when it has one, and
hands them to one swappable callable, `LlamaAttention.attention_impl`: dense attention by default, the
routed attention of the surgery after `surgery.routed_attention.inject_routers`. Its contract:

    attention_impl(q, k, v, *, x, mode, cache, lengths, **attention_kwargs) -> (o, aux, cache)
    q: [batch, seq, heads, head_dim]
    k, v: [batch, seq, kv_heads, head_dim] (train, prefill); the whole cache [batch, S, kv_heads, head_dim]
          with the new token already written (decode)
    x: [batch, seq, hidden] (the layer's attention input, after input_layernorm)
    cache: LayerCache or None (train); lengths: [batch] int32, tokens already in the cache (the new
          token's index in decode; the prompt lengths in prefill)
    o: [batch, seq, heads, head_dim]   aux: dict of per-layer diagnostics (losses, densities)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from llama_surgery_jax.model.config import ModelConfig, Precision

MODES = ("train", "prefill", "decode")
# Decode caches hold whole blocks of this many slots (`inference.cache.init_cache`): the decode kernels read blocks.
DECODE_BLOCK = 128


class LayerCache(NamedTuple):
    """One layer's KV cache. k, v: [b, S, kv_heads, d] in the compute dtype; codes: [b, r, S] int32 routing
    codes per routing head (routed layers; -1 where unwritten; budgeted block mode: [b, r, 2, ceil(S / T)],
    each block's query code then key code), router_inputs: [b, T, hidden] the router inputs of the last T
    positions (block_prefix and block routers), selection: block mode's current row per sequence
    (`routed_attention.RowSelection`); None where unused."""

    k: jax.Array
    v: jax.Array
    codes: jax.Array | None = None
    router_inputs: jax.Array | None = None
    selection: Any = None


AttentionImpl = Callable[..., tuple[jax.Array, dict[str, Any], LayerCache | None]]


def rope_inverse_frequencies(config: ModelConfig) -> jax.Array:
    """[head_dim // 2] float32, with Llama 3.1's `llama3` rescaling when configured."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    # Long wavelengths are divided by `factor`, short ones kept, the band between interpolated.
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    interpolated = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    is_medium = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return jnp.where(is_medium, interpolated, scaled)


def rope_cos_sin(config: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """positions: [batch, seq] int → cos, sin: [batch, seq, head_dim] float32 (HF's half layout)."""
    freqs = positions[..., None].astype(jnp.float32) * rope_inverse_frequencies(config)
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [batch, seq, heads, head_dim]; cos, sin: [batch, seq, head_dim]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, x=None, mode: str = "train",
                    cache: LayerCache | None = None, lengths: jax.Array | None = None, attention: str = "reference",
                    **_) -> tuple[jax.Array, dict, LayerCache | None]:
    """Causal grouped-query softmax attention; scores and softmax in float32 (the contract above).

    attention="kernel" (prefill on a GPU): the best dense kernel jax offers, cuDNN flash attention, in bf16. It is
    named: `jax.nn.dot_product_attention` without `implementation` runs XLA's unfused softmax attention (jax
    0.10–0.11), 30× slower at 8k tokens, which the dense baselines measured before 2026-12-02 were.
    """
    if mode == "decode":  # query i = lengths[b] sees the cache slots j <= i
        return dense_decode(q, k, v, lengths, attention), {}, cache
    if attention == "kernel":
        low = q.dtype if q.dtype in (jnp.bfloat16, jnp.float16) else jnp.bfloat16
        implementation = "cudnn" if jax.default_backend() == "gpu" else None  # None: XLA (CPU tests)
        out = jax.nn.dot_product_attention(q.astype(low), k.astype(low), v.astype(low), is_causal=True,
                                           implementation=implementation)
        return out.astype(q.dtype), {}, cache
    t, s = q.shape[1], k.shape[1]
    return grouped_attention(q, k, v, jnp.tril(jnp.ones((t, s), dtype=bool), k=s - t)), {}, cache


def dense_decode(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, attention: str | None) -> jax.Array:
    """One new token per sequence (q: [b, 1, heads, d], its k and v already at slot lengths[b] of the cache).

    attention="kernel": flash-decoding, `dense_decode_attention` (split-K over the written blocks, GQA-native, bf16;
    the cache's slots must be whole blocks, as `inference.cache.init_cache` makes them). "cudnn": jax's cuDNN
    attention with the sequence lengths as a padding mask (a peer measured by `speed`). Otherwise the masked
    attention over every slot in float32, which reads and scores the unwritten slots too.
    """
    if attention == "kernel" and k.shape[1] % DECODE_BLOCK == 0:
        from pallas_kernels.block_sparse_attention import dense_decode_attention

        low = q.dtype if q.dtype in (jnp.bfloat16, jnp.float16) else jnp.bfloat16
        out = dense_decode_attention(q[:, 0].astype(low), k.astype(low), v.astype(low), lengths, tile=DECODE_BLOCK)
        return out[:, None].astype(q.dtype)
    if attention == "cudnn":
        low = q.dtype if q.dtype in (jnp.bfloat16, jnp.float16) else jnp.bfloat16
        out = jax.nn.dot_product_attention(q.astype(low), k.astype(low), v.astype(low), implementation="cudnn",
                                           query_seq_lengths=jnp.ones_like(lengths), key_value_seq_lengths=lengths + 1)
        return out.astype(q.dtype)
    visible = jnp.arange(k.shape[1])[None, :] <= lengths[:, None]
    return grouped_attention(q, k, v, visible[:, None, :])


def grouped_attention(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array) -> jax.Array:
    """q: [b, t, heads, d]; k, v: [b, s, kv_heads, d]; visible: bool broadcastable to [b, t, s] → [b, t, heads, d]."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, t, kv, h // kv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) / math.sqrt(d)
    scores = jnp.where(jnp.broadcast_to(visible, (b, t, k.shape[1]))[:, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, d).astype(q.dtype)


class Linear(nnx.Module):
    """y = x Wᵀ with W: [out, in], HF's `nn.Linear(bias=False)` layout."""

    def __init__(self, d_in: int, d_out: int, *, precision: Precision, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        self.weight = nnx.Param(init(rngs.params(), (d_out, d_in), precision.params))
        self.compute_dtype = precision.compute

    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.weight[...].astype(self.compute_dtype)
        return jnp.einsum("...i,oi->...o", x.astype(self.compute_dtype), w)


class Embedding(nnx.Module):
    """Token embedding, weight: [vocab, hidden] (HF's `embed_tokens.weight`)."""

    def __init__(self, vocab: int, dim: int, *, precision: Precision, rngs: nnx.Rngs):
        self.weight = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (vocab, dim), precision.params))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return self.weight[...][tokens]


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, precision: Precision):
        self.weight = nnx.Param(jnp.ones((dim,), precision.params))
        self.eps = eps
        self.compute_dtype = precision.compute

    def __call__(self, x: jax.Array) -> jax.Array:
        # As HF: normalise in float32, cast back, then scale.
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(self.compute_dtype) * normed.astype(self.compute_dtype)


class LlamaAttention(nnx.Module):
    def __init__(self, config: ModelConfig, *, precision: Precision, rngs: nnx.Rngs):
        d, hd = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, hd)
        self.q_proj = Linear(d, self.num_heads * hd, precision=precision, rngs=rngs)
        self.k_proj = Linear(d, self.num_kv_heads * hd, precision=precision, rngs=rngs)
        self.v_proj = Linear(d, self.num_kv_heads * hd, precision=precision, rngs=rngs)
        self.o_proj = Linear(self.num_heads * hd, d, precision=precision, rngs=rngs)
        self.attention_impl: AttentionImpl = dense_attention

    def project(self, x, cos, sin) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x: [b, t, hidden] → q [b, t, heads, head_dim], k, v [b, t, kv_heads, head_dim], RoPE applied."""
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def __call__(self, x, cos, sin, *, mode: str = "train", cache: LayerCache | None = None,
                 lengths: jax.Array | None = None, **attention_kwargs):
        """x: [b, t, hidden] → (out [b, t, hidden], aux, cache). Prefill writes the prompt's k, v to slots
        [0, t) of the cache; decode writes the new token's at slot lengths[b] and attends over the cache."""
        b, t, _ = x.shape
        q, k, v = self.project(x, cos, sin)
        if mode == "prefill":
            cache = cache._replace(k=cache.k.at[:, :t].set(k.astype(cache.k.dtype)),
                                   v=cache.v.at[:, :t].set(v.astype(cache.v.dtype)))
        elif mode == "decode":
            batch = jnp.arange(b)
            cache = cache._replace(k=cache.k.at[batch, lengths].set(k[:, 0].astype(cache.k.dtype)),
                                   v=cache.v.at[batch, lengths].set(v[:, 0].astype(cache.v.dtype)))
            k, v = cache.k, cache.v
        elif mode != "train":
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        out, aux, cache = self.attention_impl(q, k, v, x=x, mode=mode, cache=cache, lengths=lengths,
                                              **attention_kwargs)
        return self.o_proj(out.reshape(b, t, -1)), aux, cache


class LlamaMLP(nnx.Module):
    def __init__(self, config: ModelConfig, *, precision: Precision, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        self.gate_proj = Linear(d, f, precision=precision, rngs=rngs)
        self.up_proj = Linear(d, f, precision=precision, rngs=rngs)
        self.down_proj = Linear(f, d, precision=precision, rngs=rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, *, precision: Precision, rngs: nnx.Rngs):
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps, precision=precision)
        self.self_attn = LlamaAttention(config, precision=precision, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, precision=precision)
        self.mlp = LlamaMLP(config, precision=precision, rngs=rngs)

    def __call__(self, x, cos, sin, **attention_kwargs):
        """x: [b, t, hidden] → (x, aux, cache); mode, cache and lengths as `LlamaAttention`."""
        attn_out, aux, cache = self.self_attn(self.input_layernorm(x), cos, sin, **attention_kwargs)
        x = x + attn_out
        return x + self.mlp(self.post_attention_layernorm(x)), aux, cache


class LlamaModel(nnx.Module):
    def __init__(self, config: ModelConfig, *, precision: Precision, rngs: nnx.Rngs):
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, precision=precision, rngs=rngs)
        self.layers = nnx.List(
            [LlamaDecoderLayer(config, precision=precision, rngs=rngs)
             for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, precision=precision)


class LlamaForCausalLM(nnx.Module):
    """`model(tokens) -> (logits, aux)`; tokens: [batch, seq] int → logits: [batch, seq, vocab] float32.

    aux is a tuple with one dict per layer from its `attention_impl` (empty for dense attention).
    `attention_kwargs` (e.g. the router's temperature and RNG key) reach every `attention_impl`.
    With mode="prefill" or "decode" and a cache (one `LayerCache` per layer, `inference.cache`), the
    call returns (logits, aux, cache): the same layers, in the mode the module docstring describes.
    """

    def __init__(self, config: ModelConfig, *, precision: Precision = Precision(), rngs: nnx.Rngs):
        self.config = config
        self.precision = precision
        self.model = LlamaModel(config, precision=precision, rngs=rngs)
        self.lm_head = (None if config.tie_word_embeddings
                        else Linear(config.hidden_size, config.vocab_size, precision=precision, rngs=rngs))

    def hidden_states(self, tokens: jax.Array, positions: jax.Array | None = None, *, remat: bool = False,
                      mode: str = "train", cache: tuple[LayerCache, ...] | None = None,
                      lengths: jax.Array | None = None, **attention_kwargs):
        """tokens: [batch, seq] → final normed hidden states [batch, seq, hidden], aux, cache.

        remat: recompute each decoder layer in the backward pass instead of keeping its activations
        (Llama 3.1 8B at 8k tokens keeps ~1.9 GB per layer in bf16 otherwise: ~61 GB over 32 layers).
        """
        b, t = tokens.shape
        if positions is None:
            start = lengths[:, None] if mode == "decode" else 0
            positions = start + jnp.broadcast_to(jnp.arange(t), (b, t))
        cos, sin = rope_cos_sin(self.config, positions)
        x = self.model.embed_tokens(tokens).astype(self.precision.compute)
        aux, caches = [], []
        for index, layer in enumerate(self.model.layers):
            layer_cache = None if cache is None else cache[index]
            x, layer_aux, layer_cache = (checkpointed(layer) if remat else layer)(
                x, cos, sin, mode=mode, cache=layer_cache, lengths=lengths, **attention_kwargs)
            aux.append(layer_aux)
            caches.append(layer_cache)
        return self.model.norm(x), tuple(aux), (None if cache is None else tuple(caches))

    def logits(self, hidden: jax.Array) -> jax.Array:
        if self.lm_head is None:
            w = self.model.embed_tokens.weight[...].astype(self.precision.compute)
            return jnp.einsum("btd,vd->btv", hidden, w, preferred_element_type=jnp.float32)
        return self.lm_head(hidden).astype(jnp.float32)

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None, *, remat: bool = False,
                 mode: str = "train", cache: tuple[LayerCache, ...] | None = None, lengths: jax.Array | None = None,
                 **attention_kwargs):
        hidden, aux, cache = self.hidden_states(tokens, positions, remat=remat, mode=mode, cache=cache,
                                                lengths=lengths, **attention_kwargs)
        if mode == "train":
            return self.logits(hidden), aux
        return self.logits(hidden), aux, cache


def checkpointed(layer: nnx.Module):
    """`layer` called under `jax.checkpoint`: its activations are recomputed in the backward pass.

    The layer is split into its state (traced) and graph, so parameter paths stay those of the plain
    model (checkpoints are interchangeable). Python scalars among the kwargs (train, hard) stay static.
    """
    graphdef, state = nnx.split(layer)

    def call(x, cos, sin, **kwargs):
        static = {k: v for k, v in kwargs.items() if isinstance(v, (bool, int, float, str, type(None)))}
        dynamic = {k: v for k, v in kwargs.items() if k not in static}

        def run(state, x, cos, sin, dynamic):
            return nnx.merge(graphdef, state)(x, cos, sin, **static, **dynamic)

        return jax.checkpoint(run)(state, x, cos, sin, dynamic)

    return call


def abstract_model(config: ModelConfig, precision: Precision = Precision()) -> LlamaForCausalLM:
    """The model with ShapeDtypeStruct leaves: shapes and dtypes, no memory (8B builds on a laptop)."""
    return nnx.eval_shape(lambda: LlamaForCausalLM(config, precision=precision, rngs=nnx.Rngs(0)))


def count_params(model: nnx.Module, filter=nnx.Param) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, filter)))
