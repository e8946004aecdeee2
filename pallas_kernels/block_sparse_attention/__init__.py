"""Block-sparse causal attention for Llama Surgery: reference, schedule, kernels, public API."""

from .api import DEFAULT_TILE, block_sparse_attention, bucket_tiles, merge_partials, token_routed_attention
from .backward import sparse_attention_backward, transpose_schedule
from .forward import Rule, sparse_attention_forward
from .forward_hopper import hopper_attention_forward, hopper_supported
from .reference import chunked_reference_attention, reference_attention, token_mask
from .route_gradient import SoftMask
from .schedule import Schedule, block_density, build_schedule, codes_tile_mask, sink_window_tiles, validate_schedule

__all__ = [
    "DEFAULT_TILE",
    "Rule",
    "Schedule",
    "SoftMask",
    "block_density",
    "block_sparse_attention",
    "bucket_tiles",
    "build_schedule",
    "chunked_reference_attention",
    "codes_tile_mask",
    "merge_partials",
    "reference_attention",
    "sink_window_tiles",
    "sparse_attention_backward",
    "sparse_attention_forward",
    "hopper_attention_forward",
    "hopper_supported",
    "transpose_schedule",
    "token_mask",
    "token_routed_attention",
    "validate_schedule",
]
