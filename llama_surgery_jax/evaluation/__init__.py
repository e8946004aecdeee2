"""Evaluation: perplexity, needle in a haystack, the quality-density study, density reports, speed, and the report at
the end of router training."""
