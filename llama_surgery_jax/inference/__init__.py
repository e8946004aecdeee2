"""Inference: the KV cache with prefill and decode, and generation."""
