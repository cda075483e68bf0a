"""Tokenizers: items' feature vectors -> semantic ids (RQ-VAE, residual k-means)."""
