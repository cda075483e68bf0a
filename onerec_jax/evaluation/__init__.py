"""Evaluation: full-ranking scorer, metrics with confidence intervals."""
