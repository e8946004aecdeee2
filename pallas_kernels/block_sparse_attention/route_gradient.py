"""The router's gradient on one computed tile of the backward kernels (METHOD.md §5), fused.

The routed attention multiplies the scores by a straight-through mask: forward the hard mask, backward
the soft mask σ((d_max − d) / T) of the soft tree distance d of two tokens' routes. For a visible pair
∂L/∂m_ij is the softmax-score gradient dS_ij that the backward kernels already hold, so the router's
gradient is computed where dS is, tile by tile, and never as an N × N array:

    M_u[i, j] = Σ_c r[i, u, c] r[j, u, c]                  agreement at level u (root = L − 1)
    d_ij      = L − Σ_ℓ min_{u ≥ ℓ} M_u[i, j]              soft tree distance
    ∂L/∂d_ij  = −dS_ij σ (1 − σ) / T
    ∂L/∂M_u   = −∂L/∂d · (number of suffix minima that level u attains)
    ∂L/∂r[i, u, c] += Σ_j ∂L/∂M_u[i, j] r[j, u, c]         (the dq kernel: query side)
    ∂L/∂r[j, u, c] += Σ_i ∂L/∂M_u[i, j] r[i, u, c]         (the dk/dv kernel: key side)

Ties go to the level nearest the leaves, as `llama_surgery_jax.router.tree_distance`'s VJP (with one-hot
routes every minimum ties). One pass root → leaves finds the minima and keeps, per pair, the set of
levels that take the minimum over as the bits of one int32; a pass leaves → root turns it into counts.
Every product is elementwise float32 (no tensor-core rounding), so the result equals the chunked JAX
route gradient up to summation order.

Routes travel as [batch, routing heads, levels · choices, tokens] float32 (a column per (level, choice)
is one contiguous load of a tile's tokens).
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp


class SoftMask(NamedTuple):
    """Static description of the straight-through soft mask (hashable: a kernel parameter)."""

    d_max: float
    temperature: float
    levels: int
    choices: int


def agreement_grads(ds, row_route, col_route, soft: SoftMask):
    """Yield (level u, ∂L/∂M_u [rows, cols]) for one tile, leaves first.

    ds: [rows, cols] float32, ∂L/∂m (zero where the pair is not visible); row_route(u, c) → [rows] and
    col_route(u, c) → [cols] float32: route probabilities of the tile's query and key tokens.
    """
    def agreement(u):
        total = None
        for c in range(soft.choices):
            term = row_route(u, c)[:, None] * col_route(u, c)[None, :]
            total = term if total is None else total + term
        return total

    # Root → leaves: suffix minima and their sum; bit u set when level u takes the minimum over.
    running = agreement(soft.levels - 1)
    shared = running
    takes_over = jnp.full(ds.shape, 1 << (soft.levels - 1), jnp.int32)
    for u in reversed(range(soft.levels - 1)):
        level = agreement(u)
        takes_over = takes_over | jnp.where(level <= running, 1 << u, 0)
        running = jnp.minimum(running, level)
        shared = shared + running
    distance = soft.levels - shared
    sigma = 1.0 / (1.0 + jnp.exp((distance - soft.d_max) / soft.temperature))
    d_distance = -ds * sigma * (1.0 - sigma) / soft.temperature

    # Leaves → root: a level that takes over is the minimum of every suffix from itself down to the next
    # level below that takes over.
    last = jnp.full(ds.shape, -1, jnp.int32)
    for u in range(soft.levels):
        on = (takes_over & (1 << u)) != 0
        count = jnp.where(on, u - last, 0)
        last = jnp.where(on, u, last)
        yield u, -d_distance * count.astype(jnp.float32)
