"""Evaluation: perplexity, needle in a haystack, the quality-density study, density reports."""
