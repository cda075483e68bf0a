"""onerec_jax: generative recommendation (OneRec, TIGER) and baselines in JAX/Flax."""

__version__ = "0.1.0"
