"""The surgery: a Dynamic Topology Router in every attention layer of a frozen Llama (METHOD.md §1–6).

    model = inject_routers(model, RouterConfig(), nnx.Rngs(0))   # step 0: the base model's function
    logits, aux = model(tokens, train=True, tau=tau, rng=key)     # routed; gradients reach the routers
    grads = nnx.grad(loss, argnums=nnx.DiffState(0, RouterParam))(model, ...)  # the base never differentiated

attention_kwargs of `RoutedAttention` (the model passes them to every layer; dense attention ignores them):
    train: bool = False      True: the straight-through mask of §4–5, gradients reach the routers.
                             False: the hard mask only (evaluation; no soft mask is built).
    tau: float | Array = 1.0 Gumbel-Softmax temperature (`router.tau_at(step, config)`).
    rng: key | None = None   Gumbel noise, folded with the layer index so layers draw independently.
                             None: no noise, every route is the argmax (evaluation).
    hard: bool = True        one-hot routes forward with soft gradients (straight-through); False: the
                             soft mask uses the soft routes. The hard mask is the sampled codes' either way.
    return_codes: bool = False  also return each layer's prefix codes in aux.

aux, one dict per layer (float32 scalars unless said):
    load_balance_loss   §6's L_bal for this layer (1.0 balanced, p collapsed); the train step sums them.
    token_density       visible causal pairs / causal pairs of the hard mask.
    block_density       computed causal tiles / causal tiles at tile = config.block_size, original order.
    codes               [batch, heads, seq] int32, only with return_codes=True.

Backend (`RouterExecution.attention_backend`): "reference" is the chunked plain-JAX attention; "kernel" the
block-sparse kernels, forward and backward, router gradient included (`kernel_attention`); "auto" (the
default) the kernels on a GPU for bf16/fp16 activations and head dim 64/128, the reference otherwise,
so on CPU nothing below changes.

At the homotopy initialisation every code is 0 and the mask is all causal pairs, so with train=False
or train=True the logits equal the base model's: bit for bit when `query_chunk` ≥ the sequence length
(the same arithmetic as `model.dense_attention`), and within float32 reassociation otherwise (a
chunk's P·V matmul has fewer rows; on SmolLM2 at 256 tokens 2.6e-6 relative, below the dense model's
own eager-vs-jit difference of 3.3e-6). Gumbel noise (rng given) can flip a route with probability
about e^(−2·init_bias) per level, so a noisy step 0 is dense only up to that.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from llama_surgery_jax.model.config import ModelConfig
from llama_surgery_jax.model.llama import LayerCache, LlamaForCausalLM, dense_attention
from llama_surgery_jax.surgery import mask
from llama_surgery_jax.surgery.config import RouterConfig, RouterExecution
from llama_surgery_jax.surgery.kernel_attention import (
    kernel_routed_attention,
    prefill_kernel_attention,
    resolve_backend,
    visible_pairs,
)
from llama_surgery_jax.surgery.mask import block_density, causal_pairs, tile_mask
from llama_surgery_jax.surgery.reference_attention import (
    attend,
    gathered_attention,
    masked_attention,
    straight_through_tile_attention,
    tile_masked_attention,
)
from llama_surgery_jax.surgery.router import (
    HardTopology,
    RouterParam,
    TopologyRouter,
    block_features,
    route,
    route_blocks,
    route_rows,
    routes_balance,
)

__all__ = ["RoutedAttention", "RouterParam", "RowSelection", "inject_routers", "remove_routers", "routed_layers",
           "hard_topology"]


class RowSelection(NamedTuple):
    """Block-mode decode's current row per sequence, kept in the cache (`RoutedAttention.block_decode`).
    row: [b] int32, the query block the lists are for (−1: none yet); counts: [b, r] int32; blocks: [b, r, n]
    int32, the row's key blocks in ascending order, the first `counts` entries valid."""

    row: jax.Array
    counts: jax.Array
    blocks: jax.Array

    @classmethod
    def empty(cls, batch: int, heads: int, blocks: int) -> RowSelection:
        return cls(jnp.full((batch,), -1, jnp.int32), jnp.zeros((batch, heads), jnp.int32),
                   jnp.zeros((batch, heads, blocks), jnp.int32))


def routing_head_count(router_config: RouterConfig, model_config: ModelConfig) -> int:
    """Query heads (the preprint) or KV heads (one route per GQA group)."""
    if router_config.routing_heads == "query":
        return model_config.num_attention_heads
    return model_config.num_key_value_heads


class RoutedAttention(nnx.Module):
    """The `attention_impl` of a routed layer: its router's parameters plus the routed attention, on the
    chunked reference (`masked_attention`) or on the block-sparse kernels (`kernel_attention`) as
    `RouterExecution.attention_backend` says; both compute the same function and the same gradients."""

    def __init__(self, router_config: RouterConfig, model_config: ModelConfig, layer_index: int, *,
                 rngs: nnx.Rngs, homotopy: bool = True, execution: RouterExecution = RouterExecution()):
        self.config = router_config
        self.execution = execution
        self.layer_index = layer_index
        heads = routing_head_count(router_config, model_config)
        self.router = TopologyRouter(model_config.hidden_size, heads, router_config, rngs=rngs,
                                     homotopy=homotopy)

    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, *, x: jax.Array, mode: str = "train",
                 cache: LayerCache | None = None, lengths: jax.Array | None = None, train: bool = False,
                 tau: float | jax.Array = 1.0, rng: jax.Array | None = None, hard: bool = True,
                 return_codes: bool = False, return_choices: bool = False, attention: str | None = None,
                 budget: int | None = None, **block_kwargs) -> tuple[jax.Array, dict, LayerCache | None]:
        """The `attention_impl` contract of `model.llama`: (out [b, t, heads, d], aux, cache)."""
        if self.config.mode == "block":
            if mode == "decode":
                return self.block_decode(q, k, v, x=x, cache=cache, lengths=lengths, attention=attention,
                                         **block_kwargs)
            if mode == "prefill":
                return self.block_prefill(q, k, v, x=x, cache=cache, lengths=lengths, attention=attention,
                                          **block_kwargs)
            if rng is not None:
                rng = jax.random.fold_in(rng, self.layer_index)
            out, aux = self.block_attention(q, k, v, x=x, train=train, tau=tau, rng=rng, return_codes=return_codes,
                                            attention=attention,
                                            **block_kwargs)
            return out, aux, cache
        if mode == "prefill":
            return self.prefill(q, k, v, x=x, cache=cache, lengths=lengths, attention=attention or "reference")
        if mode == "decode":
            return self.decode(q, k, v, x=x, cache=cache, lengths=lengths, budget=budget)
        if rng is not None:
            rng = jax.random.fold_in(rng, self.layer_index)
        routing = self.router(x, tau=tau, rng=rng, hard=hard)
        routes = routing.routes if train else None
        if resolve_backend(self.execution.attention_backend, q.dtype, q.shape[-1], self.config.block_size) == "kernel":
            out = kernel_routed_attention(q, k, v, routing.codes, routes, config=self.config,
                                          execution=self.execution)
            pairs = visible_pairs(routing.codes, window=self.config.window, sink=self.config.sink)
        else:
            out, pairs = masked_attention(q, k, v, routing.codes, routes, config=self.config,
                                          execution=self.execution)
        batch, heads, t = routing.codes.shape
        tiles = tile_mask(routing.codes, tile=self.config.block_size, window=self.config.window,
                          sink=self.config.sink)
        aux = {
            "load_balance_loss": routing.load_balance_loss,
            "token_density": pairs / (batch * heads * causal_pairs(t)),
            "block_density": block_density(tiles),
        }
        if return_codes:
            aux["codes"] = routing.codes
        if return_choices:
            aux["choices"] = jnp.argmax(routing.routes, axis=-1)  # [b, h, t, levels], level L − 1 = root side
        return out, aux, cache

    def block_attention(self, q, k, v, *, x, train: bool, tau, rng, block_density=None, selection: str = "router",
                        measure_recall: bool = False, return_codes: bool = False, return_mass: bool = False,
                        attention: str | None = None, given_tiles=None, thresholds=None, remat=None,
                        straight_through: bool = False, **_):
        """Budgeted block routing (METHOD.md §11, `block_routing`) → (out, aux).

        train=True (self-distillation): the layer computes the frozen model's dense attention, and aux holds
        `distill_loss`, the KL between the router's soft tile scores and the dense attention's tile mass (and
        that mass, `tile_mass` [b, h, n, n], with return_mass). With straight_through (row routing; the student
        pass of the end-to-end term, `training.loop`): the router's tiles at the budget instead, exactly as
        evaluation runs them (`select_rows`), through `straight_through_tile_attention`, whose gradient reaches
        each row's predicted mass of every candidate block, computed or not.
        train=False: the tile mask of `selection` under the budget: block_density None (the config's ρ, uniform
        over heads), a float ρ, or per-(layer, head) densities [layers, heads]; attention runs on those tiles:
        `attention` "kernel" (`block_sparse_attention`) or "reference" (`tile_masked_attention`); None: the
        execution's backend (the kernel on a GPU). selection "given": the tiles given_tiles[layer] (one
        [b, h, n, n] per layer, e.g. another run's aux["tiles"]: a replay, to compare two attention paths on one
        mask). aux: block_density (executed) and token_density per sequence [b], attention_recall [b] when
        measure_recall.
        thresholds (row selections): None, the budgets' tile count per query block, filled in row order
        (`select_rows`); a [layers, heads] table of τ, per-row thresholds (`threshold_rows`); "layer" or "head":
        the calibration pass, each sequence at τ of its own that spends the budgets' tiles (one τ per layer or
        per head), its candidates' peaks in aux["row_peaks"].
        """
        from llama_surgery_jax.surgery import block_routing as br

        config = self.config
        tile = config.block_size
        heads = self.router.routing_heads
        t = q.shape[1]
        n = -(-t // tile)
        rule = dict(tile=tile, window=config.window, sink=config.sink)
        by_rows = config.query == "row"  # the router ranks per query row (METHOD.md §12)
        if train:
            q_sg, k_sg = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
            dense_path = resolve_backend(self.execution.attention_backend, q.dtype, q.shape[-1], tile)
            out = dense_attention(q, k, v, attention=dense_path)[0]  # cuDNN on a GPU
            if by_rows and straight_through:
                return self.straight_through_rows(q, k, v, x, t, block_density)
            if straight_through:
                raise ValueError("the end-to-end term (straight_through) needs row routing: router.query=row")
            if by_rows:
                routing = route_rows(self.router.parameters(), x, config=config, routing_heads=heads)
                row_mass = br.row_attention_mass(q_sg, k_sg, tile=tile, routing_heads=heads)
                target = br.rows_ahead_mass(row_mass, tile) if config.row_target == "ahead" else row_mass
                shares = br.row_share_set(config.row_share_of, t, **rule)
                loss = br.distillation_loss(self.row_router_scores(routing, t), target, shares)
                aux = {"distill_loss": loss, "load_balance_loss": routes_balance(routing.q_routes)}
                if return_mass:
                    aux["tile_mass"] = br.tile_mass_of_rows(row_mass, tile)
                return out, aux
            routing = route_blocks(self.router.parameters(), x, config=config, routing_heads=heads, tau=tau,
                                   rng=rng, hard=False)
            mass = br.tile_attention_mass(q_sg, k_sg, tile=tile, routing_heads=heads)
            scores = br.soft_shared_depth(routing.q_routes, routing.k_routes) + br.recency_prior(n)
            aux = {"distill_loss": br.distillation_loss(scores, mass, br.candidate_tiles(n, **rule)),
                   "load_balance_loss": routing.load_balance_loss}
            if return_mass:
                aux["tile_mass"] = mass
                aux["block_features"] = block_features(x, tile)
            return out, aux
        budgets = self.row_budgets(n, block_density)
        row_wise = selection in br.ROW_SELECTIONS or (selection == "router" and by_rows)
        routing = row_mass = mass = peaks = None
        if selection == "router" or return_codes:
            routing = (route_rows(self.router.parameters(), x, config=config, routing_heads=heads) if by_rows
                       else route_blocks(self.router.parameters(), x, config=config, routing_heads=heads, tau=tau,
                                         rng=rng, hard=False))
        if measure_recall or selection in ("oracle", "global_oracle", "lagged_oracle", "row_oracle"):
            row_mass = br.row_attention_mass(q, k, tile=tile, routing_heads=heads)
            mass = br.tile_mass_of_rows(row_mass, tile)
        if selection == "given":
            given = given_tiles[self.layer_index]
            first_rows = given if given.dtype != jnp.bool_ else br.first_rows_of(given, tile)
        elif row_wise:
            scores = {"router": lambda: self.row_router_scores(routing, t),
                      "row_oracle": lambda: row_mass,
                      "row_moba": lambda: br.row_moba_score(q, k, tile=tile, routing_heads=heads),
                      "row_bound": lambda: br.row_bound_score(q, k, tile=tile, routing_heads=heads)}[selection]()
            if thresholds is None:
                first_rows = br.select_rows(scores, budgets, t=t, front=config.row_front, **rule)
            else:
                first_rows, peaks = self.threshold_rows(selection, scores, budgets, thresholds, t)
        elif thresholds is not None:
            raise ValueError(f"per-row thresholds rank rows: selection {selection!r} ranks query blocks (use "
                             f"{', '.join(br.ROW_SELECTIONS)}, or the router of a run trained with router.query=row)")
        else:
            first_rows = br.first_rows_of(self.select(selection, routing, q, k, mass, budgets, n), tile)
        tiles = first_rows < tile
        in_tile = bool(row_wise or selection == "given")  # some tiles start below their block's first row
        if attention is None:
            attention = resolve_backend(self.execution.attention_backend, q.dtype, q.shape[-1], tile)
        if attention == "kernel":
            from pallas_kernels import block_sparse_attention

            out = block_sparse_attention(q, k, v, tiles, tile=tile, first_rows=first_rows if in_tile else None)
        else:
            out = tile_masked_attention(q, k, v, tiles, tile=tile, first_rows=first_rows if in_tile else None)
        # float32: h · t²/2 pairs pass 2^31 from 32k tokens on 8 heads.
        pairs = jnp.sum(br.row_tile_pairs(first_rows, t, tile).astype(jnp.float32), axis=(1, 2, 3))
        aux = {"block_density": br.executed_density(tiles), "token_density": pairs / float(heads * causal_pairs(t))}
        if row_mass is not None:
            aux["attention_recall"] = br.row_recall(first_rows, row_mass, tile)
        if selection == "router" and by_rows and measure_recall and thresholds is None:
            aux["tie_share"] = br.tied_share(self.row_router_scores(routing, t), first_rows, **rule)
        if isinstance(thresholds, str):
            aux["row_peaks"] = peaks
        if return_codes:
            if not by_rows:
                aux["codes"] = (routing.q_codes, routing.k_codes)
            elif routing is not None:
                aux["key_routes"] = routing.k_routes
            aux["tiles"] = tiles
            aux["first_rows"] = first_rows
        return out, aux

    def straight_through_rows(self, q, k, v, x, t: int, block_density=None):
        """The student pass of the end-to-end term (`block_attention` with straight_through) → (out, aux): the row
        router's tiles at the budget (`select_rows` on its scores, no gradient through the choice), attention on
        exactly those tiles, and each row's predicted mass of each candidate block (`predicted_mass`: the scale
        thresholds read) as the soft weight the bridge sends ∂L/∂m into; forced tiles weigh 1 (no gradient)."""
        from llama_surgery_jax.surgery import block_routing as br

        config = self.config
        tile = config.block_size
        rule = dict(tile=tile, window=config.window, sink=config.sink)
        routing = route_rows(self.router.parameters(), x, config=config, routing_heads=self.router.routing_heads)
        scores = self.row_router_scores(routing, t)
        budgets = self.row_budgets(-(-t // tile), block_density)
        first_rows = br.select_rows(jax.lax.stop_gradient(scores), budgets, t=t, front=config.row_front, **rule)
        candidate = br.row_candidates(t, **rule)
        share = br.predicted_mass(scores, candidate, br.row_share_set(config.row_share_of, t, **rule))
        soft = jnp.where(candidate, share, 1.0)
        out = straight_through_tile_attention(q, k, v, first_rows, soft, tile=tile,
                                              chunk=self.execution.query_chunk)
        return out, {"load_balance_loss": routes_balance(routing.q_routes),
                     "block_density": br.executed_density(first_rows < tile)}

    def threshold_rows(self, selection: str, scores: jax.Array, budgets: jax.Array, thresholds, t: int):
        """(first_rows, peaks) of the per-row threshold rule (`block_routing.select_rows_above`) on a row selection's
        scores: masses as they are (the per-row oracle, Quest), logits as each row's predicted share of its
        candidates' mass. thresholds: a [layers, heads] τ table, or "layer"/"head" (calibration, see
        `block_attention`)."""
        from llama_surgery_jax.surgery import block_routing as br

        config = self.config
        rule = dict(tile=config.block_size, window=config.window, sink=config.sink)
        n = scores.shape[-1]
        if selection in ("router", "row_moba"):
            share_of = config.row_share_of if selection == "router" else "candidates"
            scores = br.predicted_mass(scores, br.row_candidates(t, **rule), br.row_share_set(share_of, t, **rule))
        peaks = br.row_peaks(scores, t=t, **rule)
        if isinstance(thresholds, str):
            if thresholds not in ("layer", "head"):
                raise ValueError(f"thresholds={thresholds!r}: give a [layers, heads] table, or 'layer' or 'head' "
                                 "to calibrate one")
            extra = jnp.sum(br.row_extra(budgets, n, **rule), axis=-1)
            tau = br.per_sequence_thresholds(peaks, extra, per_head=thresholds == "head")
        else:
            tau = jnp.asarray(thresholds, jnp.float32)[self.layer_index]
        return br.select_rows_above(scores, tau, t=t, **rule), peaks

    def row_router_scores(self, routing, t: int) -> jax.Array:
        """[b, h, t, n]: the row router's score of every (row, key block), the one the distillation fits: the
        summed soft shared depth over the trees plus the recency prior."""
        from llama_surgery_jax.surgery import block_routing as br

        return (br.soft_forest_depth(routing.q_routes, routing.k_routes)
                + br.row_recency_prior(t, self.config.block_size)[None, None])

    def row_budgets(self, n: int, block_density=None) -> jax.Array:
        """Tiles per (head, row) [h, n] at n blocks (`block_routing.row_budgets`, densities as `layer_densities`)."""
        from llama_surgery_jax.surgery import block_routing as br

        config = self.config
        forced = mask.band_tiles(n, tile=config.block_size, window=config.window, sink=config.sink)
        return br.row_budgets(self.layer_densities(block_density), jnp.sum(forced, axis=-1, dtype=jnp.int32))

    def layer_densities(self, block_density) -> jax.Array:
        """This layer's per-head densities [heads] from a float ρ or a [layers, heads] table (None: config's ρ)."""
        heads = self.router.routing_heads
        if block_density is None:
            block_density = self.config.block_density
        table = jnp.asarray(block_density, jnp.float32)
        if table.ndim == 0:
            return jnp.full((heads,), table)
        return table[self.layer_index]

    def select(self, selection: str, routing, q, k, mass, budgets, n: int) -> jax.Array:
        """The tile mask [b, h, n, n] of one selection rule (`block_routing.SELECTIONS`) under `budgets`."""
        from llama_surgery_jax.surgery import block_routing as br

        config = self.config
        rule = dict(tile=config.block_size, window=config.window, sink=config.sink)
        if selection == "global_oracle":
            return br.global_oracle_tiles(mass, budgets, **rule)
        if selection == "router":  # integer depths: the sort-free form of the same rule
            depth = br.shared_prefix_depth(routing.q_codes[..., :, None], routing.k_codes[..., None, :], p=config.p,
                                           levels=config.levels)
            return br.select_by_depth(depth, budgets, levels=config.levels, **rule)
        if selection == "recent":
            score = jnp.broadcast_to(br.recent_score(n), (q.shape[0], budgets.shape[0], n, n))
        elif selection == "moba":
            score = br.moba_score(q, k, tile=config.block_size, routing_heads=self.router.routing_heads)
        elif selection == "oracle":
            score = mass
        elif selection == "lagged_oracle":
            score = br.lagged_mass(mass)
        else:
            raise ValueError(f"unknown selection {selection!r}; choose one of {br.SELECTIONS}")
        return br.select_tiles(score, budgets, **rule)

    def block_prefill(self, q, k, v, *, x, cache: LayerCache, lengths: jax.Array, attention: str,
                      return_tiles: bool = False, **block_kwargs):
        """Block mode's prefill: the evaluation forward (`block_attention`, train=False: argmax codes, the
        budget rule, attention on exactly those tiles), one pass, with each block's query and key codes written
        to the cache (codes [b, r, 2, blocks]: row 0 the query codes, row 1 the key codes) and the router inputs
        of each prompt's last T positions (the ring decode routes new blocks from). Prompts are right-padded: a
        real query row never sees a padding key (causality), so its tiles are those of its own prompt; a block
        that holds padding keeps a key code that decode recomputes once the block is full."""
        out, aux = self.block_attention(q, k, v, x=x, train=False, tau=1.0, rng=None, attention=attention,
                                        return_codes=True, **block_kwargs)
        if self.config.query == "row":
            return self.row_prefill_cache(out, aux, x=x, cache=cache, lengths=lengths, return_tiles=return_tiles)
        q_codes, k_codes = aux.pop("codes")
        tiles = aux.pop("tiles")
        if return_tiles:
            aux["tiles"] = tiles
        n = q_codes.shape[-1]
        cache = cache._replace(codes=cache.codes.at[:, :, 0, :n].set(q_codes).at[:, :, 1, :n].set(k_codes),
                               router_inputs=last_positions_ring(x, lengths, self.config.block_size))
        return out, aux, cache

    def block_decode(self, q, k, v, *, x, cache: LayerCache, lengths: jax.Array, attention: str | None,
                     block_density=None, route: bool | jax.Array = True, thresholds=None, **_):
        """One new token per sequence (index i = lengths[b], its k, v already in the cache) in block mode: row
        m = i // T of the prefill's rule, so decode executes the mask prefill and training execute.

        The router input joins the ring of the last T inputs. When i opens block m (i % T = 0) the ring's mean
        is block m's query feature (the T tokens ending at its first token, as `router.block_features`); when i
        fills block m (i % T = T − 1) it is block m's key feature. A block's key code is read only by later
        query blocks, after it is full, so the codes a step reads are the prefill's (up to float32 reordering of
        the feature sums).

        Row m's tiles (`block_routing.select_row_by_depth`) depend on block m's query code and the key codes of
        blocks before m (block m itself is forced), so they hold for the whole block: the cache keeps them
        (`RowSelection`), and only a step that routes computes codes and tiles again (route True, or a traced
        bool for a `lax.cond`; due when a sequence opens or fills a block or starts decoding:
        `inference.cache.routing_due`). Other steps run no router and no selection, only attention over the kept
        tiles, masked to slots ≤ i: on the GPU `sparse_decode_attention` reads only those KV blocks (per KV head
        routing), else a masked attention over the cache.
        """
        config = self.config
        size = config.block_size
        batch = jnp.arange(q.shape[0])
        ring = cache.router_inputs.at[batch, lengths % size].set(x[:, 0].astype(cache.router_inputs.dtype))
        cache = cache._replace(router_inputs=ring)
        if config.query == "row":  # every row routes from its own query: no step may skip it
            return self.attend_kept(q, k, v, self.route_own_row(x, cache, lengths, block_density, thresholds),
                                    lengths, attention)
        if thresholds is not None:
            raise ValueError("per-row thresholds need a run trained with router.query=row: this router ranks "
                             "query blocks")
        if isinstance(route, bool):
            routed = self.route_row(ring, cache.codes, lengths, block_density) if route else (cache.codes,
                                                                                              cache.selection)
        else:  # decided on the device: the branches hold the codes and the selection, never the KV cache
            routed = jax.lax.cond(route, lambda: self.route_row(ring, cache.codes, lengths, block_density),
                                  lambda: (cache.codes, cache.selection))
        cache = cache._replace(codes=routed[0], selection=routed[1])
        return self.attend_kept(q, k, v, cache, lengths, attention)

    def attend_kept(self, q, k, v, cache: LayerCache, lengths: jax.Array, attention: str | None):
        """The attention half of `block_decode`: the new token (index lengths[b]) over the tiles its cache keeps
        (`RowSelection`), masked to slots ≤ lengths[b] → (out [b, 1, heads, d], {}, cache)."""
        size = self.config.block_size
        batch = jnp.arange(q.shape[0])
        selection = cache.selection
        if attention is None:
            attention = resolve_backend(self.execution.attention_backend, q.dtype, q.shape[-1], size)
        if attention == "kernel" and selection.blocks.shape[1] == k.shape[2]:  # one list per KV head
            from pallas_kernels.block_sparse_attention import decode_splits, sparse_decode_attention

            splits = decode_splits(q.shape[0], k.shape[2], k.shape[1] // size)
            out = sparse_decode_attention(q[:, 0], k, v, selection.blocks, selection.counts, lengths, tile=size,
                                          splits=splits)
            return out[:, None], {}, cache
        n = selection.blocks.shape[-1]
        ids = jnp.where(jnp.arange(n) < selection.counts[..., None], selection.blocks, n)  # unlisted: dropped
        heads = jnp.arange(selection.blocks.shape[1])[None, :, None]
        tiles = jnp.zeros(selection.blocks.shape, bool).at[batch[:, None, None], heads, ids].set(True, mode="drop")
        slots = jnp.arange(k.shape[1])
        visible = jnp.repeat(tiles, size, axis=-1)[..., :k.shape[1]] & (slots[None, None, :] <= lengths[:, None, None])
        return attend(q, k, v, visible[:, :, None, :]), {}, cache

    def row_prefill_cache(self, out, aux, *, x, cache: LayerCache, lengths: jax.Array, return_tiles: bool):
        """Row routing's prefill (`block_prefill` with router.query=row): the key blocks' routes go to the cache
        (codes [b, r, blocks, f, l, c]), and so does each prompt's last row's view: its block's forced tiles and
        the union of the choices of its rows up to the last, as `RowSelection`; decode extends that union one
        row at a time (`route_own_row`), so prefill ≡ decode. A block that holds padding keeps key routes that
        decode recomputes once the block is full."""
        from pallas_kernels.block_sparse_attention.schedule import compact

        size = self.config.block_size
        first_rows = aux.pop("first_rows")
        aux.pop("tiles")
        key_routes = aux.pop("key_routes")
        if return_tiles:  # the first rows, not the tiles: a replay (selection "given") runs the in-tile rows too
            aux["tiles"] = first_rows
        n = first_rows.shape[-1]
        last = lengths - 1
        row = last // size
        seen = first_rows[jnp.arange(lengths.shape[0]), :, row] <= (last % size)[:, None, None]  # [b, r, n]
        listed = compact(jnp.pad(seen, ((0, 0), (0, 0), (0, cache.selection.blocks.shape[-1] - n))))
        cache = cache._replace(codes=cache.codes.at[:, :, :n].set(key_routes.astype(cache.codes.dtype)),
                               router_inputs=last_positions_ring(x, lengths, size),
                               selection=RowSelection(row, listed.counts, listed.indices))
        return out, aux, cache

    def route_own_row(self, x: jax.Array, cache: LayerCache, lengths: jax.Array, block_density=None,
                      thresholds=None) -> LayerCache:
        """Row routing's decode step, before attention (the ring already holds x): token i = lengths[b] is row
        r = i % T of block m = i // T. Its query routes come from x, the key routes of a block it fills from the
        ring (the block's own T tokens); it adds to block m's union (kept in `RowSelection`, empty when the kept
        row is another block) its best candidates up to quota(r): the step of `block_routing.select_rows`; with
        per-row thresholds (a [layers, heads] τ table) every candidate whose predicted mass reaches τ, the step of
        `block_routing.select_rows_above`."""
        from llama_surgery_jax.surgery import block_routing as br
        from llama_surgery_jax.surgery.router import key_routes, role_routes
        from pallas_kernels.block_sparse_attention.schedule import compact

        config = self.config
        size = config.block_size
        heads = self.router.routing_heads
        params = self.router.parameters()
        batch = jnp.arange(lengths.shape[0])
        block, local = lengths // size, lengths % size
        key = key_routes(params, cache.router_inputs, config=config, routing_heads=heads)[:, :, 0]  # [b, r, f, l, c]
        fills = (local == size - 1)[:, None, None, None, None]
        block_keys = cache.codes.at[batch, :, block].set(jnp.where(fills, key, cache.codes[batch, :, block]))
        query = role_routes(params, x, role=0, config=config, routing_heads=heads)  # as prefill: x's dtype
        n = block_keys.shape[2]
        scores = br.soft_forest_depth(query, block_keys)[:, :, 0] + br.recency_prior(n)[block][:, None, :]
        rule = dict(tile=size, window=config.window, sink=config.sink)
        forced = mask.band_tiles(n, **rule)[block][:, None, :]  # [b, 1, n]
        candidate = mask.causal_tiles(n, n)[block][:, None, :] & ~forced
        kept = cache.selection
        listed = jnp.arange(n) < kept.counts[..., None]
        chosen = jnp.zeros(kept.blocks.shape, bool).at[batch[:, None, None], jnp.arange(heads)[None, :, None],
                                                       jnp.where(listed, kept.blocks, n)].set(True, mode="drop")
        chosen = chosen & (kept.row == block)[:, None, None] & candidate
        if thresholds is None:
            extra = br.row_extra(self.row_budgets(n, block_density), n, **rule)[:, block].T  # [b, r]
            quota = jnp.take_along_axis(br.row_quota(extra, size, config.row_front), local[:, None, None],
                                        axis=-1)[..., 0]
            pick = br.union_step(scores, chosen, quota - jnp.sum(chosen, axis=-1, dtype=jnp.int32), candidate)
        else:
            tau = jnp.asarray(thresholds, jnp.float32)[self.layer_index]  # [r]
            share_of = None
            if config.row_share_of == "earlier_blocks":
                share_of = (jnp.arange(n)[None, :] < block[:, None])[:, None, :]  # [b, 1, n]
            pick = candidate & ~chosen & (br.predicted_mass(scores, candidate, share_of) >= tau[None, :, None])
        rows = compact(forced | chosen | pick)
        return cache._replace(codes=block_keys, selection=RowSelection(block, rows.counts, rows.indices))

    def route_row(self, ring: jax.Array, codes: jax.Array, lengths: jax.Array, block_density=None):
        """The routing half of `block_decode` (ring [b, T, hidden] already holds the new token's input) → (codes,
        RowSelection): the codes of a block that opens or fills at i = lengths[b], and row i // T's selection, for
        every sequence (a sequence inside a block gets the selection it already holds)."""
        from llama_surgery_jax.surgery import block_routing as br
        from llama_surgery_jax.surgery.router import block_codes
        from pallas_kernels.block_sparse_attention.schedule import compact

        config = self.config
        size = config.block_size
        batch = jnp.arange(lengths.shape[0])
        positions = lengths[:, None] - jnp.arange(size)[None, :]  # i, i − 1, …, i − T + 1
        window = jnp.take_along_axis(ring, (positions % size)[..., None], axis=1).astype(jnp.float32)
        valid = (positions >= 0)[..., None]
        mean = (jnp.sum(jnp.where(valid, window, 0.0), axis=1) / jnp.sum(valid, axis=1).astype(jnp.float32))[:, None]
        fresh_query, fresh_key = block_codes(self.router.parameters(), mean, config=config,
                                             routing_heads=self.router.routing_heads)
        block = lengths // size  # codes: [b, r, 2, blocks]
        query_code = jnp.where((lengths % size == 0)[:, None], fresh_query[..., 0], codes[batch, :, 0, block])
        key_code = jnp.where((lengths % size == size - 1)[:, None], fresh_key[..., 0], codes[batch, :, 1, block])
        codes = codes.at[batch, :, 0, block].set(query_code).at[batch, :, 1, block].set(key_code)
        n = codes.shape[-1]
        depth = br.shared_prefix_depth(query_code[..., None], codes[:, :, 1], p=config.p, levels=config.levels)
        tiles = br.select_row_by_depth(depth, self.row_budgets(n, block_density), block, levels=config.levels,
                                       tile=size, window=config.window, sink=config.sink)  # [b, r, n]
        listed = compact(tiles)
        return codes, RowSelection(block, listed.counts, listed.indices)

    def prefill(self, q, k, v, *, x, cache: LayerCache, lengths: jax.Array, attention: str):
        """The prompt with evaluation routes (argmax, no noise); its codes (and, in block mode, the router
        inputs of each prompt's last T positions) go to the cache. attention: "reference" (the chunked
        training attention) or "kernel" (the code-sorted block-sparse kernels, bf16)."""
        codes = self.router(x).codes
        if attention == "kernel":
            out = prefill_kernel_attention(q, k, v, codes, config=self.config)
        else:
            out = masked_attention(q, k, v, codes, None, config=self.config, execution=self.execution)[0]
        cache = cache._replace(codes=cache.codes.at[:, :, :codes.shape[-1]].set(codes))
        if self.config.mode == "block_prefix":
            cache = cache._replace(router_inputs=last_positions_ring(x, lengths, self.config.block_size))
        return out, {}, cache

    def decode(self, q, k, v, *, x, cache: LayerCache, lengths: jax.Array, budget: int | None):
        """One new token per sequence (index lengths[b], its k and v already in the cache): its codes from its
        own router input (token mode) or its block's (block mode), then attention over the slots the rule of
        `mask.visible` lets it see. budget None: masked over every slot; M: the first M visible keys per
        (sequence, routing head) gathered (aux["keys_seen"] > M means the step must be repeated)."""
        batch = jnp.arange(q.shape[0])
        if self.config.mode == "block_prefix":
            ring = cache.router_inputs.at[batch, lengths % self.config.block_size].set(x[:, 0])
            cache = cache._replace(router_inputs=ring)
            new_codes = decode_block_codes(self.router, self.config, ring, cache.codes, lengths)
        else:
            new_codes = self.router(x).codes[:, :, 0]  # [b, r]
        cache = cache._replace(codes=cache.codes.at[batch, :, lengths].set(new_codes))
        slots = jnp.arange(cache.codes.shape[-1])[None, None, :]
        visible = mask.visible(lengths[:, None, None], slots, new_codes[..., None], cache.codes,
                               window=self.config.window, sink=self.config.sink)  # [b, r, S]
        if budget is None:
            return attend(q, k, v, visible[:, :, None, :]), {}, cache
        out, most = gathered_attention(q[:, 0], k, v, visible, budget)
        return out[:, None], {"keys_seen": most}, cache


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


def routed_layers(model: LlamaForCausalLM) -> list[RoutedAttention]:
    """The RoutedAttention of every layer, in order (empty for a model without routers)."""
    impls = [layer.self_attn.attention_impl for layer in model.model.layers]
    return [impl for impl in impls if isinstance(impl, RoutedAttention)]


def inject_routers(model: LlamaForCausalLM, router_config: RouterConfig, rngs: nnx.Rngs, *,
                   homotopy: bool = True, execution: RouterExecution = RouterExecution()) -> LlamaForCausalLM:
    """Gives every attention layer a fresh router (in place; returns the model).

    homotopy=True: the §3 initialisation, so the model still computes the base model's function.
    execution: how the routed attention runs (backend, query chunk, router gradient), not what it computes.
    Router parameters are float32 `RouterParam`s whatever the base model's dtype.
    """
    for index, layer in enumerate(model.model.layers):
        # nnx.data: the attribute held a plain function (static) until now; a module is pytree data.
        layer.self_attn.attention_impl = nnx.data(
            RoutedAttention(router_config, model.config, index, rngs=rngs, homotopy=homotopy, execution=execution))
    return model


def remove_routers(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """Back to dense attention in every layer (in place; returns the model): the dense baseline."""
    for layer in model.model.layers:
        layer.self_attn.attention_impl = nnx.static(dense_attention)
    return model


def hard_topology(model: LlamaForCausalLM, tokens: jax.Array, *, tile: int | None = None,
                  positions: jax.Array | None = None,
                  rng: jax.Array | None = None) -> tuple[HardTopology, ...]:
    """tokens: [b, t] → per layer HardTopology(codes [b, h, t] int32, tile_mask [b, h, n, n] bool).

    The evaluation routes (argmax; Gumbel-sampled when rng is given) that the kernels must execute;
    tile defaults to the router config's block_size.
    """
    layers = routed_layers(model)
    if not layers:
        raise ValueError("the model has no routers: call inject_routers first")
    config = layers[0].config
    tile = config.block_size if tile is None else tile

    @nnx.jit  # one program: run op by op, the routed forward of a report took minutes on a CPU
    def topologies(model, tokens, positions, rng):
        _, aux = model(tokens, positions, train=False, rng=rng, return_codes=True)
        return tuple(HardTopology(a["codes"], tile_mask(a["codes"], tile=tile, window=config.window,
                                                        sink=config.sink)) for a in aux)

    return topologies(model, tokens, positions, rng)
