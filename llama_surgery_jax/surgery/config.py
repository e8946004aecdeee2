"""The router's config: what is learned (the tree, the mask rule), how it executes, and its schedules."""

from __future__ import annotations

import dataclasses

from llama_surgery_jax.model.config import ConfigError
from llama_surgery_jax.surgery.mask import SINK, WINDOW


@dataclasses.dataclass(frozen=True)
class RouterConfig:
    """What the router learns and the mask it defines (METHOD.md §3–6, symbols as there). Only these
    settings shape the routers' parameters and what they mean: a resumed run must keep them.

    A query token i sees key j iff j <= i and (prefix codes equal on the top `levels - d_max` levels,
    or sink and j == 0, or window is not None and i - j <= window, or i == j): `mask.visible`.
    """

    p: int = 2  # tree arity, prime
    levels: int = 13  # L = ceil(log_p N_ref); fixed by the context trained for, not by a config field
    d_max: int = 6  # largest visible tree distance; k = levels - d_max prefix levels must agree
    window: int | None = WINDOW  # local window W in tokens (i - j <= W visible); None: no window
    sink: bool = SINK  # token 0 always visible
    routing_heads: str = "query"  # "query": one route per query head (preprint); "kv": per KV head
    # "token": per-token routes, the preprint's rule above. "block_prefix": the same rule with one route per
    # block from pooled causal block features. "block": budgeted block routing (METHOD.md §11,
    # `block_routing`): each query block computes its forced tiles and its closest key blocks in the tree
    # up to a density budget; d_max is unused, all `levels` digits rank.
    mode: str = "token"
    block_size: int = 128  # block of the block modes and tile of the kernels
    # Block mode: what ranks the key blocks. "block": one code per query block, from the T tokens before it
    # (METHOD.md §11). "row": every query row its own code (from its own router input), each tile computed from
    # the first row of its block that chose it, so row i sees the union of the choices of rows <= i of its
    # block (METHOD.md §12, `block_routing.select_rows`).
    query: str = "block"
    # Row queries: independent trees per routing head, ranked by their summed soft shared depth (a score with
    # many values: one tree's hard depth has levels + 1 and most candidates tie).
    trees: int = 1
    # Block mode only, read at evaluation (a run may be evaluated at any ρ): the executed block density ρ
    # of every layer, and how it is spread over the (layer, head) pairs: "adaptive" (per-head densities
    # calibrated on the training data so that heads with spread attention take more), "sensitivity" (per-layer
    # densities by each layer's measured perplexity sensitivity on training data, `training.calibration`) or
    # "uniform".
    block_density: float = 0.2
    budget: str = "adaptive"
    # Row queries: the share of a query block's budget its first row may fill; later rows fill the rest evenly
    # (1.0: the first row chooses every tile; 0.0: each row an equal share).
    row_front: float = 0.5
    # Row queries: what the router is distilled on. "ahead": for row i, the mean mass of its block's rows i … end (a
    # pick is seen by them under the prefix union); "own": row i's own mass, what per-row thresholds compare.
    row_target: str = "ahead"
    # Row queries: the set over which the router's scores are a share of each row's mass, in distillation and at
    # run time (per-row thresholds compare these shares across rows). "candidates": the candidates' mass;
    # "earlier_blocks": every key block before the row's own (sink and window included; a block's key code needs
    # all of it), so a row whose attention stays on the sink or the window gives its candidates small shares.
    row_share_of: str = "candidates"
    # Row queries: a key block's router input. "mean_input": the mean of its tokens' router inputs; "max_hidden": the
    # per-feature max of its tokens' backbone outputs (a block with one salient token keeps it).
    key_pool: str = "mean_input"
    soft_mask_temperature: float = 0.5  # T_m
    init_bias: float = 5.0  # homotopy init: +b for child 0, -b for the others

    def __post_init__(self):
        if self.p < 2 or any(self.p % f == 0 for f in range(2, int(self.p**0.5) + 1)):
            raise ConfigError(f"p={self.p} must be a prime")
        if self.levels < 1 or not 0 <= self.d_max <= self.levels:
            raise ConfigError(f"need levels >= 1 and 0 <= d_max <= levels, got {self.levels}, {self.d_max}")
        if self.window is not None and self.window < 0:
            raise ConfigError(f"window={self.window} must be >= 0 or None")
        check_choices(self, {"routing_heads": ("query", "kv"), "mode": ("token", "block_prefix", "block"),
                             "budget": ("adaptive", "uniform", "sensitivity"),
                             "query": ("block", "row"), "row_target": ("ahead", "own"),
                             "row_share_of": ("candidates", "earlier_blocks"),
                             "key_pool": ("mean_input", "max_hidden")})
        if self.trees < 1 or (self.trees > 1 and self.query != "row"):
            raise ConfigError(f"router.trees={self.trees}: must be >= 1, and more than one needs router.query=row")
        if self.query == "row" and self.mode != "block":
            raise ConfigError("router.query=row ranks key blocks under a budget: it needs router.mode=block")
        if not 0.0 <= self.row_front <= 1.0:
            raise ConfigError(f"router.row_front={self.row_front} must be in [0, 1]: the share of a block's budget "
                              "its first row may fill")
        if not 0.0 < self.block_density <= 1.0:
            raise ConfigError(f"router.block_density={self.block_density} must be in (0, 1]: the fraction of "
                              "causal tiles computed")
        if self.mode == "block" and self.p**self.levels > 2**31 - 1:
            raise ConfigError(f"block mode ranks full codes: p^levels = {self.p}^{self.levels} overflows int32")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size={self.block_size} must be a power of two (the kernels take 16 and up)")
        # Codes are int32 in [0, p^k), and the kernels pad with INT32_MAX: p^k must stay below it.
        if self.num_codes > 2**31 - 1:
            raise ConfigError(f"p^(levels - d_max) = {self.p}^{self.prefix_levels} codes overflow int32: "
                              "lower levels or raise d_max")

    # Settings read at evaluation only: a run resumes, and is evaluated, with any value of them.
    EVALUATION_FIELDS = ("block_density", "budget", "row_front")

    def learned(self) -> dict:
        """The settings that shape what the routers learn (a resumed run must keep them)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.EVALUATION_FIELDS}

    @classmethod
    def from_dict(cls, values: dict) -> RouterConfig:
        """From a run's recorded settings; fields of other configs (older runs kept τ, λ and the backend
        here) are left out."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

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


@dataclasses.dataclass(frozen=True)
class RouterExecution:
    """How routed attention runs: memory and speed, never the function computed (the paths agree to
    rounding), so a run may resume with other values."""

    # "reference": the chunked plain-JAX attention (reference_attention.py); "kernel": the block-sparse
    # kernels (kernel_attention.py; interpret mode on CPU); "auto": kernel on a GPU for bf16/fp16 and
    # head dim 64/128, reference otherwise.
    attention_backend: str = "auto"
    query_chunk: int = 128  # query rows per step of the chunked attention (memory ~ chunk × seq)
    # The router's gradient on the kernel backend. "chunked": plain JAX over query chunks against all keys
    # (O(N²) elementwise, measured on the H100); "fused": Pallas kernels beside the attention's backward,
    # on its computed tiles only (pallas_kernels/block_sparse_attention/route_gradient.py; checked in
    # interpret mode and compiled offline for sm_90, its GPU run is pending). The reference backend
    # differentiates masked_attention either way.
    router_gradient: str = "chunked"

    def __post_init__(self):
        check_choices(self, {"attention_backend": ("auto", "reference", "kernel"),
                             "router_gradient": ("chunked", "fused")})
        if self.query_chunk < 1:
            raise ConfigError(f"query_chunk must be positive, got {self.query_chunk}")


@dataclasses.dataclass(frozen=True)
class RouterSchedule:
    """Training schedules (METHOD.md §6): Gumbel-Softmax temperature τ and load-balancing weight λ per step."""

    tau_start: float = 1.0
    tau_end: float = 0.1
    tau_steps: int = 100
    tau_schedule: str = "linear"  # or "cosine"
    lambda_max: float = 1.0
    lambda_steps: int = 50

    def __post_init__(self):
        check_choices(self, {"tau_schedule": ("linear", "cosine")})


def check_choices(config, choices: dict[str, tuple[str, ...]]) -> None:
    for field, allowed in choices.items():
        if getattr(config, field) not in allowed:
            raise ConfigError(f"{field}={getattr(config, field)!r}; choose one of {list(allowed)}")
