"""Block-sparse causal attention for Llama Surgery: reference, schedule, kernels, public API."""

from .api import DEFAULT_TILE, block_sparse_attention, merge_partials, token_routed_attention, token_routed_tiles
from .backward import sparse_attention_backward, transpose_schedule
from .decode import decode_splits, dense_decode_attention, gather_decode_attention, sparse_decode_attention
from .forward import Rule, sparse_attention_forward
from .forward_hopper import hopper_attention_forward, hopper_supported
from .reference import chunked_reference_attention, reference_attention
from .route_gradient import SoftMask
from .schedule import Schedule, build_schedule, validate_schedule

__all__ = [
    "DEFAULT_TILE",
    "Rule",
    "Schedule",
    "SoftMask",
    "block_sparse_attention",
    "build_schedule",
    "chunked_reference_attention",
    "decode_splits",
    "dense_decode_attention",
    "gather_decode_attention",
    "merge_partials",
    "reference_attention",
    "sparse_attention_backward",
    "sparse_attention_forward",
    "sparse_decode_attention",
    "hopper_attention_forward",
    "hopper_supported",
    "transpose_schedule",
    "token_routed_attention",
    "token_routed_tiles",
    "validate_schedule",
]
