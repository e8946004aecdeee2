"""Inference with a KV cache: routed prefill, then token-by-token decode that reads only visible keys.

    logits, cache = prefill(model, tokens, lengths, max_len=S, attention="auto")   # one pass over the prompts
    logits, cache, overflow = decode_step(model, cache, next_tokens, budget=M)    # one new token per sequence

Both run the model's own decoder layers in mode "prefill" or "decode" (`model.llama`): this module only
builds the cache, resolves the attention path and repeats a decode step whose gather budget overflowed.
The cache holds, per layer (`LayerCache`), K and V of every written token and, for routed layers, each
token's prefix codes per routing head; query i sees cached key j by `surgery.mask.visible`. Block-mode
routers route a block of T tokens from the mean of the T router inputs that end at its first token: the
cache keeps those inputs for the last T positions (a ring per layer). Prompts of different lengths are
right-padded: position = index, and a padding slot is never visible (causality hides it from the prompt;
decode overwrites it before any query can see it, because sequence b writes its next token at index
lengths[b]).

Prefill attention (`attention`): "reference" runs the chunked masked attention of the training path
(float32, any head size); "kernel" runs `pallas_kernels.token_routed_attention` for routed layers (sorted
buckets plus the sink/window band, exact token routing; bf16) and cuDNN flash attention for dense layers;
"auto" is "kernel" on a GPU when the head size allows it, else "reference".

Decode attention: budget=None attends over the whole cache with the mask (reads every key); budget=M
gathers, per (sequence, routing head), the first M visible keys and attends over those alone (reads M
keys). If a head sees more than M keys the step reports `overflow` and `Decoder` repeats it with a
larger budget, so the result never depends on the budget.

Shapes: b batch, t tokens, S cache slots, h query heads, k KV heads, r routing heads, d head dim.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama_surgery_jax.model.config import ConfigError
from llama_surgery_jax.model.llama import DECODE_BLOCK, LayerCache, LlamaForCausalLM
from llama_surgery_jax.surgery.config import RouterConfig
from llama_surgery_jax.surgery.kernel_attention import resolve_backend
from llama_surgery_jax.surgery.routed_attention import RoutedAttention, RowSelection, routed_layers
from llama_surgery_jax.training.budget import Budget

ATTENTION_CHOICES = ("auto", "reference", "kernel")


class ContextError(ValueError):
    """Prompts (plus the tokens to generate) that do not fit the model's context, or empty prompts."""


class KVCache(NamedTuple):
    """layers: one `LayerCache` per decoder layer; lengths: [b] int32, tokens written per sequence (the next
    token goes to index lengths[b])."""

    layers: tuple[LayerCache, ...]
    lengths: jax.Array


def router_config(model: LlamaForCausalLM) -> RouterConfig | None:
    """The routers' config (the same in every layer), or None for a dense model."""
    layers = routed_layers(model)
    return layers[0].config if layers else None


def resolve_attention(attention: str, model: LlamaForCausalLM) -> str:
    """'auto' → the training backend's rule (`kernel_attention.resolve_backend`) for the model's compute dtype."""
    if attention not in ATTENTION_CHOICES:
        raise ValueError(f"attention must be one of {ATTENTION_CHOICES}, got {attention!r}")
    config = router_config(model)
    return resolve_backend(attention, model.precision.compute, model.config.head_dim,
                           config.block_size if config is not None else 128)


def check_kernel(attention: str, model: LlamaForCausalLM) -> None:
    """Raises ConfigError when `attention` asks for the kernels and a routed model's activations are not theirs
    (`kernel_attention.kernel_applies`: bf16 or fp16, head dim 64 or 128, a kernel tile)."""
    from llama_surgery_jax.surgery.kernel_attention import KERNEL_HEAD_DIMS, kernel_applies

    config = router_config(model)
    if attention != "kernel" or config is None:
        return
    dtype, head_dim = jnp.dtype(model.precision.compute), model.config.head_dim
    if not kernel_applies(dtype, head_dim, config.block_size):
        raise ConfigError(f"--attention kernel: the kernels take bfloat16 or float16 activations, head dim "
                          f"{' or '.join(map(str, KERNEL_HEAD_DIMS))} and a kernel tile; this model runs {dtype.name}, "
                          f"head dim {head_dim}, tile {config.block_size}: use --attention reference (or auto)")


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


def init_cache(model: LlamaForCausalLM, batch: int, slots: int) -> tuple[LayerCache, ...]:
    """An empty cache of `slots` positions per sequence (rounded up to whole blocks), one `LayerCache`
    per layer (codes −1: unwritten)."""
    config = model.config
    dtype = model.precision.compute
    blocks = {impl.config.block_size for impl in routed_layers(model) if impl.config.mode == "block"}
    block = max(blocks | {DECODE_BLOCK})  # whole blocks, as the decode kernels read them; slots past a sequence's
    slots = -(-slots // block) * block    # length are never visible
    layers = []
    for layer in model.model.layers:
        impl = layer.self_attn.attention_impl
        k = jnp.zeros((batch, slots, config.num_key_value_heads, config.head_dim), dtype)
        codes = ring = selection = None
        if isinstance(impl, RoutedAttention) and impl.config.mode == "block":  # per block: query and key codes
            blocks = slots // impl.config.block_size
            codes = jnp.full((batch, impl.router.routing_heads, 2, blocks), -1, jnp.int32)
            if impl.config.query == "row":  # row routing keeps each key block's soft routes
                codes = jnp.zeros((batch, impl.router.routing_heads, blocks, impl.config.trees, impl.config.levels,
                                   impl.config.p), jnp.float32)
            ring = jnp.zeros((batch, impl.config.block_size, config.hidden_size), dtype)
            selection = RowSelection.empty(batch, impl.router.routing_heads, blocks)
        elif isinstance(impl, RoutedAttention):
            codes = jnp.full((batch, impl.router.routing_heads, slots), -1, jnp.int32)
            if impl.config.mode == "block_prefix":
                ring = jnp.zeros((batch, impl.config.block_size, config.hidden_size), dtype)
        layers.append(LayerCache(k, jnp.zeros_like(k), codes, ring, selection))
    return tuple(layers)


def prefill(model: LlamaForCausalLM, tokens: jax.Array, lengths: jax.Array, *, max_len: int,
            attention: str = "reference", last_only: bool = False, return_aux: bool = False,
            **attention_kwargs) -> tuple[jax.Array, KVCache]:
    """tokens: [b, t] int (right-padded), lengths: [b] int → logits [b, t, vocab] float32, KVCache of S = max_len.

    attention: "reference" or "kernel" (resolved, see the module docstring). last_only: logits [b, vocab] of
    each prompt's last token only (what generation needs: at 128k tokens the whole prompt's logits of an
    8B model would be 67 GB). attention_kwargs reach every layer (block mode: block_density, selection,
    return_tiles). return_aux: also the layers' aux dicts (executed densities), as a third value.
    """
    lengths = jnp.asarray(lengths, jnp.int32)
    empty = init_cache(model, tokens.shape[0], max_len)
    hidden, aux, layers = model.hidden_states(tokens, mode="prefill", cache=empty, lengths=lengths,
                                              attention=attention, **attention_kwargs)
    if last_only:
        hidden = hidden[jnp.arange(tokens.shape[0]), lengths - 1][:, None]
    logits = model.logits(hidden)
    logits = logits[:, 0] if last_only else logits
    return (logits, KVCache(layers, lengths), aux) if return_aux else (logits, KVCache(layers, lengths))


def decode_step(model: LlamaForCausalLM, cache: KVCache, tokens: jax.Array, *, budget: int | None = None,
                route: bool | None = None, **attention_kwargs) -> tuple[jax.Array, KVCache, jax.Array]:
    """tokens: [b] int, the next token of each sequence → (logits [b, vocab] float32, cache, overflow).

    budget None: masked attention over every cache slot. budget M: only the first M visible keys per
    (sequence, routing head) are read; overflow (bool scalar) says some head saw more, and the step must
    be repeated with a larger budget. Dense layers read the causal prefix. attention_kwargs reach every layer
    (block mode: block_density, as in prefill; attention: "kernel" for the decode kernels).

    route (block mode): True runs every layer's router and row selection; False reuses the rows the cache keeps,
    which is right only when `routing_due` is false (no sequence opens or fills a block or starts decoding); None
    decides on the device (a `lax.cond` per layer around its routing half, whose operands are the codes and the
    selection: a cond over the whole step would carry the KV cache through it, and XLA copies it). A caller that
    knows the lengths on the host passes a bool and runs one of two programs, with no cond.
    """
    config = router_config(model)
    block_mode = config is not None and config.mode == "block"
    if route is None and block_mode:  # a traced bool: each layer's routing half runs under a lax.cond
        rows = kept_rows(cache)
        route = jnp.any(routing_due(cache.lengths, rows, config.block_size))
    if block_mode:
        attention_kwargs["route"] = route
    logits, aux, layers = model(tokens[:, None], mode="decode", cache=cache.layers, lengths=cache.lengths,
                                budget=budget, **attention_kwargs)
    overflow = jnp.zeros((), bool)
    for layer_aux in aux:
        if "keys_seen" in layer_aux:
            overflow = overflow | (layer_aux["keys_seen"] > budget)
    return logits[:, 0], KVCache(layers, cache.lengths + 1), overflow


def kept_rows(cache: KVCache) -> jax.Array:
    """[b] int32: the row each sequence's kept block selection is for (`RowSelection.row`; block mode)."""
    return next(layer.selection.row for layer in cache.layers if layer.selection is not None)


def routing_due(lengths, rows, tile: int):
    """Per sequence (numpy or jax arrays): must a block-mode decode step at index `lengths` route? Yes when the new
    token opens a block (a new row: its query code and selection), fills one (its key code), or the kept
    selection is for another row (`rows`: `RowSelection.row`; the first step after a prefill)."""
    return (lengths % tile == 0) | (lengths % tile == tile - 1) | (rows != lengths // tile)


def greedy_decode(model: LlamaForCausalLM, cache: KVCache, tokens: jax.Array, steps: int,
                  **attention_kwargs) -> tuple[jax.Array, KVCache]:
    """`steps` greedy decode steps in one program (a `lax.scan`): tokens [b] → (the next tokens [b, steps], cache).

    One dispatch for all the steps, so a small model's decode is not bound by the host launching each step.
    Masked or block-mode attention only (a token-mode gather budget may overflow, which needs the host).
    attention_kwargs reach `decode_step` (route=False: no step may be due; `greedy_plan` says which are).
    """
    def step(carry, _):
        cache, tokens = carry
        logits, cache, _ = decode_step(model, cache, tokens, **attention_kwargs)
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return (cache, tokens), tokens

    (cache, _), new = jax.lax.scan(step, (cache, tokens), length=steps)
    return new.T, cache


PLAIN_RUNS = (32, 4, 1)  # the lengths of the compiled programs that run steps without routing


def greedy_plan(lengths, rows, steps: int, tile: int) -> list[tuple[bool, int]]:
    """Block-mode decode of `steps` tokens from the host's lengths [b] and kept rows [b] (`RowSelection.row`) →
    runs (route, n): (True, 1) a step that routes, (False, n) n steps that do not, n in PLAIN_RUNS.

    A block of T tokens needs two steps that route per sequence (it opens and fills) and T − 2 that only attend:
    those run as `greedy_decode(..., route=False)` programs of fixed lengths, no `lax.cond` in them (a cond on
    the GPU waits for the device to reach it), so decode costs the routing of one step per T/2."""
    lengths, rows = np.asarray(lengths), np.asarray(rows)
    runs, plain = [], 0
    for step in range(steps):
        if np.any(routing_due(lengths + step, rows, tile)):
            runs += [(False, n) for n in _split(plain)] + [(True, 1)]
            plain, rows = 0, (lengths + step) // tile
        else:
            plain += 1
    return runs + [(False, n) for n in _split(plain)]


def _split(count: int) -> list[int]:
    """count as a sum of PLAIN_RUNS, largest first."""
    out = []
    for n in PLAIN_RUNS:
        out += [n] * (count // n)
        count %= n
    return out


class Decoder:
    """Jitted prefill and decode steps for one model (split once; one compile per shape and budget).

    `budget_step` is the gather granularity: budgets are multiples of it (fewer recompiles), starting
    at `initial_budget` and doubling on overflow. gather=False (and dense models): masked decode over the
    whole cache.
    """

    def __init__(self, model: LlamaForCausalLM, *, attention: str = "auto", gather: bool = True,
                 budget_step: int = 128, initial_budget: int | None = None, block_budget: Budget | None = None):
        """block_budget (block mode): the densities prefill and decode run at (`training.budget.run_budget`); None:
        the router config's ρ for every head."""
        self.graphdef, self.state = nnx.split(model)
        self.attention = resolve_attention(attention, model)
        self.routed = router_config(model) is not None
        self.gather = gather
        self.budget_step = budget_step
        self.budget = initial_budget
        self.compile_s = 0.0
        graphdef = self.graphdef
        config = router_config(model)
        self.block_size = config.block_size if config is not None and config.mode == "block" else None
        if block_budget is None and self.block_size is not None:
            block_budget = Budget(config.block_density, "uniform", config.block_density)
        self.block_budget = block_budget if self.block_size is not None else None
        # A traced argument (one program for every ρ or table), and only for block mode, whose layers take it.
        self.density = None if self.block_budget is None else self.block_budget.arguments()

        def densities(density):
            return {} if density is None else density

        def prefill_fn(state, density, tokens, lengths, max_len):
            return prefill(nnx.merge(graphdef, state), tokens, lengths, max_len=max_len, attention=self.attention,
                           **densities(density))

        def decode_fn(state, density, cache, tokens, budget, route):
            return decode_step(nnx.merge(graphdef, state), cache, tokens, budget=budget, attention=self.attention,
                               route=route, **densities(density))

        def greedy_fn(state, density, cache, tokens, steps, route):
            return greedy_decode(nnx.merge(graphdef, state), cache, tokens, steps, attention=self.attention,
                                 route=route, **densities(density))

        self._prefill = jax.jit(prefill_fn, static_argnums=(4,))
        self._decode = jax.jit(decode_fn, static_argnums=(4, 5), donate_argnums=(2,))
        self._greedy = jax.jit(greedy_fn, static_argnums=(4, 5), donate_argnums=(2,))
        # Greedy tokens in device loops: dense and block-mode models (a token-mode gather budget needs the host).
        self.loops = self.block_size is not None or not self.routed or not self.gather

    def with_budget(self, block_budget: Budget) -> Decoder:
        """This block-mode decoder under other densities, sharing its compiled programs (ρ is an argument)."""
        if self.block_budget is None:
            raise ValueError("with_budget needs a block-mode routed model")
        other = copy.copy(self)
        other.block_budget = block_budget
        other.density = block_budget.arguments()
        return other

    def describe(self) -> str:
        """What the decode runs (after a generation, the token-mode gather budget it grew to)."""
        if self.block_budget is not None:
            return f"block-sparse, router selection, {self.block_budget.describe()}"
        if not self.routed:
            return f"dense ({self.attention} attention over the cache)"
        if self.gather:
            return f"token routes, gather (budget {self.budget or self.budget_step} keys per head)"
        return "token routes, masked over the cache"

    def prefill(self, tokens: jax.Array, lengths: jax.Array, max_len: int) -> tuple[jax.Array, KVCache]:
        """tokens: [b, t], lengths: [b] → logits [b, t, vocab], cache of max_len slots."""
        return self._prefill(self.state, self.density, tokens, lengths, max_len)

    def greedy(self, cache: KVCache, tokens: jax.Array, steps: int) -> tuple[jax.Array, KVCache]:
        """tokens: [b] → (the next `steps` greedy tokens [b, steps], cache), in device loops without the host between
        steps: block mode by `greedy_plan`'s runs, dense in runs of PLAIN_RUNS steps (few compiled lengths)."""
        if not self.loops:
            raise ValueError("greedy device loops need a dense or block-mode model (or gather=False): a token-mode "
                             "gather budget may overflow, which needs the host; use step()")
        self.check_room(cache, steps)
        if self.block_size is not None:
            rows = kept_rows(cache)
            plan = greedy_plan(np.asarray(cache.lengths), np.asarray(rows), steps, self.block_size)
        else:
            plan = [(None, n) for n in _split(steps)]
        new = []
        for route, n in plan:
            chunk, cache = self._greedy(self.state, self.density, cache, tokens, n, route)
            new.append(chunk)
            tokens = chunk[:, -1]
        return jnp.concatenate(new, axis=1), cache

    @staticmethod
    def check_room(cache: KVCache, steps: int = 1) -> None:
        """A write past the last slot would be dropped by JAX without a word, and the logits silently wrong."""
        slots, longest = cache.layers[0].k.shape[1], int(jnp.max(cache.lengths))
        if longest + steps > slots:
            raise ContextError(f"the cache is full: a sequence holds {longest} of {slots} slots and {steps} more "
                               "tokens were asked for; prefill with a larger max_len (prompt + new tokens)")

    def step(self, cache: KVCache, tokens: jax.Array) -> tuple[jax.Array, KVCache]:
        """tokens: [b] → logits [b, vocab], cache; repeats the step with a doubled budget on overflow."""
        self.check_room(cache)
        slots = cache.layers[0].k.shape[1]
        if self.block_size is not None:  # block mode: the host says whether the step routes (no cond on the device)
            rows = kept_rows(cache)
            route = bool(np.any(routing_due(np.asarray(cache.lengths), np.asarray(rows), self.block_size)))
            logits, cache, _ = self._decode(self.state, self.density, cache, tokens, None, route)
            return logits, cache
        if not self.gather or not self.routed:  # dense decode sees the whole causal prefix: no gather
            logits, cache, _ = self._decode(self.state, self.density, cache, tokens, None, None)
            return logits, cache
        if self.budget is None:
            self.budget = min(slots, self.budget_step)
        while True:
            logits, new_cache, overflow = self._decode(self.state, self.density, cache, tokens, self.budget, None)
            if not bool(overflow):
                return logits, new_cache
            # Slots before the new token are intact (it wrote only its own slot, which the repeat
            # overwrites): step back and repeat with twice the budget.
            cache = new_cache._replace(lengths=new_cache.lengths - 1)
            self.budget = min(slots, 2 * self.budget)
