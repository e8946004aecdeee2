"""Block-sparse causal attention for Llama Surgery: reference, schedule, kernels, public API."""

from .api import (DEFAULT_TILE, block_sparse_attention, bucket_tiles, merge_partials,
                  token_routed_attention)
from .forward import Rule, sparse_attention_forward
from .reference import chunked_reference_attention, reference_attention, token_mask
from .schedule import (Schedule, block_density, build_schedule, codes_tile_mask, sink_window_tiles,
                       validate_schedule)

__all__ = [
    "DEFAULT_TILE", "Rule", "Schedule", "block_density", "block_sparse_attention", "bucket_tiles",
    "build_schedule", "chunked_reference_attention", "codes_tile_mask", "merge_partials",
    "reference_attention", "sink_window_tiles", "sparse_attention_forward", "token_mask",
    "token_routed_attention", "validate_schedule",
]
