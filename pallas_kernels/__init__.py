"""Pallas GPU kernels for llama-surgery-jax."""

from .block_sparse_attention import (
    SoftMask,
    block_sparse_attention,
    build_schedule,
    chunked_reference_attention,
    reference_attention,
    token_routed_attention,
)

__all__ = [
    "SoftMask",
    "block_sparse_attention",
    "build_schedule",
    "chunked_reference_attention",
    "reference_attention",
    "token_routed_attention",
]
