"""The router's config: what is learned (the tree, the mask rule), how it executes, and its schedules."""

from __future__ import annotations

import dataclasses

from llama_surgery_jax.model.config import ConfigError
from llama_surgery_jax.surgery.mask import SINK, WINDOW


@dataclasses.dataclass(frozen=True)
class RouterConfig:
    """The Dynamic Topology Router of METHOD.md §3–6 (symbols as there).

    A query token i sees key j iff j <= i and (prefix codes equal on the top `levels - d_max` levels,
    or sink and j == 0, or window is not None and i - j <= window, or i == j).
    """

    p: int = 2  # tree arity, prime
    levels: int = 13  # L = ceil(log_p N_ref); fixed by the context trained for, not by a config field
    d_max: int = 6  # largest visible tree distance; k = levels - d_max prefix levels must agree
    window: int | None = WINDOW  # local window W in tokens (i - j <= W visible); None: no window
    sink: bool = SINK  # token 0 always visible
    routing_heads: str = "query"  # "query": one route per query head (preprint); "kv": per KV head
    mode: str = "token"  # "token": per-token routes; "block": routes from pooled causal block features
    block_size: int = 128  # block of the block-level mode and tile of the kernels
    query_chunk: int = 128  # query rows per step of the chunked reference attention (memory ~ chunk × seq)
    # "reference": the chunked plain-JAX attention (masked_attention.py); "kernel": the block-sparse
    # kernels (kernel_attention.py; interpret mode on CPU); "auto": kernel on a GPU for bf16/fp16 and
    # head dim 64/128, reference otherwise.
    attention_backend: str = "auto"
    # The router's gradient on the kernel backend. "chunked": plain JAX over query chunks against all keys
    # (O(N²) elementwise, measured on the H100); "fused": Pallas kernels beside the attention's backward,
    # on its computed tiles only (pallas_kernels/block_sparse_attention/route_gradient.py; checked in
    # interpret mode and compiled offline for sm_90, its GPU run is pending). The reference backend
    # differentiates masked_attention either way.
    router_gradient: str = "chunked"
    soft_mask_temperature: float = 0.5  # T_m
    init_bias: float = 5.0  # homotopy init: +b for child 0, -b for the others
    tau_start: float = 1.0
    tau_end: float = 0.1
    tau_steps: int = 100
    tau_schedule: str = "linear"  # or "cosine"
    lambda_max: float = 1.0
    lambda_steps: int = 50

    def __post_init__(self):
        if self.p < 2 or any(self.p % f == 0 for f in range(2, int(self.p**0.5) + 1)):
            raise ConfigError(f"p={self.p} must be a prime")
        if self.levels < 1 or not 0 <= self.d_max <= self.levels:
            raise ConfigError(f"need levels >= 1 and 0 <= d_max <= levels, got {self.levels}, {self.d_max}")
        if self.window is not None and self.window < 0:
            raise ConfigError(f"window={self.window} must be >= 0 or None")
        choices = {"routing_heads": ("query", "kv"), "mode": ("token", "block"),
                   "tau_schedule": ("linear", "cosine"), "attention_backend": ("auto", "reference", "kernel"),
                   "router_gradient": ("chunked", "fused")}
        for field, allowed in choices.items():
            if getattr(self, field) not in allowed:
                raise ConfigError(f"{field}={getattr(self, field)!r}; choose one of {list(allowed)}")
        for field in ("block_size", "query_chunk"):
            if getattr(self, field) < 1:
                raise ConfigError(f"{field} must be positive, got {getattr(self, field)}")

    @property
    def prefix_levels(self) -> int:
        """k = L - d_max: the top levels whose choices form a token's prefix code."""
        return self.levels - self.d_max

    @property
    def num_codes(self) -> int:
        """p^k distinct prefix codes."""
        return self.p**self.prefix_levels

    @classmethod
    def for_context(cls, n_ref: int = 8192, p: int = 2, d_max: int | None = None, **fields) -> RouterConfig:
        """L = ceil(log_p n_ref) (exact integer arithmetic) and d_max = floor(L / 2) unless given."""
        levels = 1
        while p**levels < n_ref:
            levels += 1
        return cls(p=p, levels=levels, d_max=levels // 2 if d_max is None else d_max, **fields)
